"""A method whose server needs each client's own message (tests/test_protocol.py): FFA-LoRA's
weighted mean, computed by the server from the individual messages instead of a pre-summed one."""

import dataclasses

import numpy as np

from raysim.methods.common import apply_step
from raysim.methods.ffa_lora import FFALoRA
from raysim.methods.protocol import Aggregation, RoundInput, ServerState


class PerClientMean(FFALoRA):
    name = "toy_per_client"
    aggregation = Aggregation.PER_CLIENT

    def aggregate(self, state: ServerState, round_input: RoundInput) -> ServerState:
        if not round_input.messages:
            return state
        total = sum(weight for _, weight, _ in round_input.messages)
        mean = {k: sum(w * m.summable[k].astype(np.float64) for _, w, m in round_input.messages) / total for k in state.adapter}
        step = {k: (self.server_lr * v).astype(state.adapter[k].dtype) for k, v in mean.items()}
        return dataclasses.replace(state, adapter=apply_step(state.adapter, step))


METHOD = PerClientMean
