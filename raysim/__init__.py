"""raysim: federated LoRA and FFA-LoRA fine-tuning of language models, simulated on Ray."""

from raysim.config import ConfigError, UserError, from_dict, load_config

__version__ = "0.1.0"
__all__ = ["Simulation", "load_config", "from_dict", "ConfigError", "UserError"]


def __getattr__(name):
    # Importing raysim stays cheap (no Ray, torch) until the Simulation is asked for.
    if name == "Simulation":
        from raysim.runtime.simulation import Simulation

        return Simulation
    raise AttributeError(name)
