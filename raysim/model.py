"""Building the resident model: a transformers sequence classifier (task=classification) or causal
LM (task=causal_lm) with a PEFT LoRA adapter.

No Ray here. Every process that builds the model with the same config and seed gets the same
base weights, task head and LoRA A matrices, so workers agree without shipping the model.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch

from raysim.config import UserError
from raysim.methods import build as build_method
from raysim.methods.common import BASE_LAYER, is_lora_a, is_lora_tensor, seeded_lora_a


@contextlib.contextmanager
def _quiet():
    """Silence transformers' load reports and PEFT's warnings; errors still raise."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()


def quiet_load(what: str, name: str, load):
    """``load()`` without transformers' load reports; its errors as a UserError naming model.name_or_path."""
    try:
        with _quiet():
            return load()
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load {what} '{name}': {str(err).splitlines()[0]}") from None


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every name in lora.target_modules must match a module, as PEFT matches a list (the whole
    name, or its end after a dot): PEFT itself refuses only a list that matches nothing, so a
    typo beside a right name would silently adapt fewer layers."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
            raise UserError(f"lora.target_modules: '{target}' matches no module of the model (its linear layers: {', '.join(linear)})")


def _wrap_lora(cfg, model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, list(cfg.lora.target_modules))

    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM" if cfg.task == "causal_lm" else "SEQ_CLS",
    )
    try:
        with _quiet():
            return get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"lora.target_modules: {str(err).splitlines()[0]}") from None


def build_model(cfg, num_labels: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The base model (frozen) wrapped by PEFT LoRA, on ``device``, in train mode; ``num_labels``
is the classifier's (unused for a causal LM, whose output layer stays frozen).

    A matrices come from :func:`seeded_lora_a` (same in every process); the LoRA tensors the
    method's adapter does not train are frozen (every client trains the same tensors: see
    :meth:`raysim.methods.protocol.Method.adapter`), after the method's own change to the model's
    structure (:meth:`~raysim.methods.protocol.Method.prepare_model`). The task head is part of the
    adapter (PEFT's modules_to_save).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    method = build_method(cfg)
    spec = method.adapter(0)
    name = cfg.model.name_or_path
    causal = cfg.task == "causal_lm"
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    overrides = dict(cfg.model.config_overrides) | ({} if causal else {"num_labels": num_labels})
    torch.manual_seed(cfg.seed)  # same random base weights and head everywhere
    if cfg.model.init == "random":
        config = quiet_load("a model config from", name, lambda: AutoConfig.from_pretrained(name, **overrides))
        model = quiet_load("a model from", name, lambda: auto.from_config(config))
    else:
        model = quiet_load("a model from", name, lambda: auto.from_pretrained(name, **overrides))
    model.to(device)  # before get_peft_model, so adapter tensors are created on the device
    model = _wrap_lora(cfg, model)
    method.prepare_model(model)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if is_lora_a(param_name):
                param.copy_(torch.from_numpy(seeded_lora_a(param_name, tuple(param.shape), cfg.seed)))
            if param.requires_grad:
                param.requires_grad_(spec.trains(param_name))
    model.train()  # transformers loads in eval mode; dropout (and Opacus hooks) need train mode
    return model


def context_length(cfg) -> int | None:
    """The model's largest position (its config's max_position_embeddings), or None where the
    config does not say; read on the driver to check data.max_length before anything starts."""
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    config = quiet_load("a model config from", name, lambda: AutoConfig.from_pretrained(name, **dict(cfg.model.config_overrides)))
    return getattr(config, "max_position_embeddings", None)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter tensors a client trains and sends, by PEFT parameter name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: p.detach().cpu().numpy().copy() for name, p in trainable_parameters(model).items()}


def frozen_lora_a(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The LoRA tensors the method keeps frozen, e.g. FFA-LoRA's A (empty for plain LoRA)."""
    return {
        name: p.detach().cpu().numpy().copy()
        for name, p in model.named_parameters()
        if is_lora_tensor(name) and not p.requires_grad
    }


MERGED_BASE_FILE = "merged_base.safetensors"


def adapted_base_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The base weights of the layers LoRA adapts (``<module>.base_layer.weight``), by PEFT name."""
    return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters() if name.endswith(BASE_LAYER + "weight")}


def base_model_name(peft_name: str) -> str:
    """A PEFT parameter name as the base model names it: ``base_model.model.x.query.base_layer.weight``
    -> ``x.query.weight``."""
    return peft_name.removeprefix("base_model.model.").replace(BASE_LAYER, ".")
