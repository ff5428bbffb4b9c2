"""FFA-LoRA: Federated Freeze-A LoRA (Youbang Sun, Zitao Li, Yaliang Li, Bolin Ding; ICLR 2024,
"Improving LoRA in Privacy-preserving Federated Learning").

A is drawn once from a seed shared by all clients (:func:`raysim.methods.common.seeded_lora_a`)
and frozen; only the zero-initialised B (and the task head) is trained and sent. With A shared,
averaging B is exact: mean_i(B_i A) = mean_i(B_i) A. Uplink and downlink carry half the LoRA
tensors, and DP noise added to B is not multiplied by a noisy A.
"""

from raysim.methods.common import LORA_A
from raysim.methods.protocol import AdapterSpec, Method


class FFALoRA(Method):
    name = "ffa_lora"
    exact = True  # one A for all: mean_i(B_i A) = mean_i(B_i) A

    def adapter(self, client_id: int) -> AdapterSpec:
        """Everything but the frozen A matrices."""
        return AdapterSpec(rank=self.rank_of(client_id), frozen_kinds=(LORA_A,))
