"""Federated LoRA methods, one module each, registered by name.

A method module provides ``NAME``, ``trains(param_name) -> bool`` (which adapter tensors a client
trains and sends) and ``aggregate(delta_sum, total_weight) -> update``, which turns the workers'
summed, weighted client deltas into one update of the global adapter. The server optimizer
(:func:`raysim.methods.common.server_step`) then applies it.
"""

from types import ModuleType

from raysim.methods import ffa_lora, lora

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (lora, ffa_lora)}


def get(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(METHODS)})") from None
