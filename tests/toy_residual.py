"""A method written outside raysim, as a user would: FFA-LoRA whose clients send their B update
rounded to a grid of ``step`` and keep what rounding left out for their next round (error
feedback). It changes only what a client sends: one file, no edit to raysim (tests/test_protocol.py)."""

from dataclasses import dataclass

from raysim.methods.ffa_lora import FFALoRA
from raysim.methods.protocol import ClientUpdate, Message


@dataclass(frozen=True)
class Options:
    step: float = 1e-3

    def __post_init__(self):
        if self.step <= 0:
            raise ValueError(f"step: {self.step} must be > 0")


class ResidualB(FFALoRA):
    name = "toy_residual"
    Options = Options

    def client_message(self, update: ClientUpdate, state: dict) -> Message:
        sent = {}
        for name, delta in super().client_message(update, state).summable.items():
            carried = delta + state[name] if name in state else delta
            sent[name] = (carried / self.options.step).round() * self.options.step
            state[name] = carried - sent[name]
        return Message(summable=sent)


METHOD = ResidualB
