"""Plain LoRA federated with FedAvg of A and B separately ("FedIT", Zhang et al., ICASSP 2024).

Every client trains both A and B (plus the task head) and sends both. The server averages A and B
independently, which is inexact: mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i) once clients diverge.
The run logs that gap per round as ``aggregation_error``. ``privacy.mode=central_dp`` or
``local_dp_sgd`` add Gaussian noise to the LoRA updates (raysim's mechanisms, docs/PRIVACY.md); DP-LoRA
(Liu et al., 2023) is in that family, but no source specifies its mechanism, so neither is claimed
to be it.
"""

from raysim.methods.protocol import Method


class LoRA(Method):
    """Every adapter tensor trained and sent; the protocol's defaults are FedIT."""

    name = "lora"
