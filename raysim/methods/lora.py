"""Plain LoRA federated with FedAvg of A and B separately ("FedIT", Zhang et al., ICASSP 2024).

Every client trains both A and B (plus the task head) and sends both. The server averages A and B
independently, which is inexact: mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i) once clients diverge.
The run logs that gap per round as ``aggregation_error``. With ``privacy.mode=central_dp`` or
``local_dp_sgd`` this is DP-LoRA (Liu et al., 2023): Gaussian noise on the LoRA updates.
"""

from raysim.methods.protocol import Method


class LoRA(Method):
    """Every adapter tensor trained and sent; the protocol's defaults are FedIT."""

    name = "lora"
