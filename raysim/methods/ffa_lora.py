"""FFA-LoRA: Federated Freeze-A LoRA (Sun, Qin, Zhang, Li; ICLR 2024, "Improving LoRA in
Privacy-preserving Federated Learning").

A is drawn once from a seed shared by all clients (:func:`raysim.methods.common.seeded_lora_a`)
and frozen; only the zero-initialised B (and the task head) is trained and sent. With A shared,
averaging B is exact: mean_i(B_i A) = mean_i(B_i) A. Uplink and downlink carry half the LoRA
tensors, and DP noise added to B is not multiplied by a noisy A.
"""

from raysim.methods.common import mean_delta, is_lora_a

NAME = "ffa_lora"


def trains(name: str) -> bool:
    """Everything but the frozen A matrices."""
    return not is_lora_a(name)


aggregate = mean_delta
