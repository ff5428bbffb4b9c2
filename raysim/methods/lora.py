"""Plain LoRA federated with FedAvg of A and B separately ("FedIT", Zhang et al., ICASSP 2024).

Every client trains both A and B (plus the task head) and sends both. The server averages A and B
independently, which is inexact: mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i) once clients diverge.
The run logs that gap per round as ``aggregation_error``.
"""

from raysim.methods.common import mean_delta

NAME = "lora"


def trains(name: str) -> bool:
    """Every adapter tensor is trained, and so sent."""
    return True


aggregate = mean_delta
