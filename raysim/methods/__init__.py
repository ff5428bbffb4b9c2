"""Federated LoRA methods, one module each, on the protocol of :mod:`raysim.methods.protocol`.

:data:`METHODS` is the one list of methods by name. ``method`` may also name a module outside
raysim (``method=mypackage.my_method``, importable here) whose ``METHOD`` is a :class:`~raysim.methods.protocol.Method`
subclass: a new method needs its own file and no edit to raysim. Such a module must be importable
on every Ray node (installed, or on PYTHONPATH).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Mapping

from raysim.methods.fed_sb import FedSB
from raysim.methods.ffa_lora import FFALoRA
from raysim.methods.flasc import FLASC
from raysim.methods.flora import FLoRA
from raysim.methods.hetlora import HetLoRA
from raysim.methods.lora import LoRA
from raysim.methods.lora_fair import LoRAFAIR
from raysim.methods.protocol import Method
from raysim.methods.ranks import client_ranks

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoRA, FFALoRA, LoRAFAIR, FLASC, FedSB, HetLoRA, FLoRA)}


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``, or ``METHOD`` of the module ``name`` names. ValueError
    naming what is wrong otherwise."""
    if name in METHODS:
        return METHODS[name]
    try:
        found_module = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a dotted name whose package is missing
        found_module = False
    if "." in name and not found_module:
        raise ValueError(f"'{name}' is not a method of raysim and cannot be imported")
    if found_module:
        found = getattr(importlib.import_module(name), "METHOD", None)
        if isinstance(found, type) and issubclass(found, Method):
            return found
        raise ValueError(f"module '{name}' has no METHOD (a raysim.methods.protocol.Method subclass)")
    raise ValueError(f"'{name}' is not one of {', '.join(METHODS)} (or a module path whose METHOD is a Method subclass)")


def method_options(cls: type[Method], values: Mapping[str, Any]) -> Any:
    """``values`` (the config's method_args) as ``cls.Options``, type-checked by OmegaConf;
    ValueError naming the bad key. An Options class checks its values' ranges in __post_init__."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = [f.name for f in dataclasses.fields(cls.Options)]
    for key in values:
        if key not in known:
            raise ValueError(f"method_args.{key}: not an option of method {cls.name} (its options: {', '.join(known) or 'none'})")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), dict(values)))
    except OmegaConfBaseException as err:
        bad = getattr(err, "full_key", None)
        why = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
        raise ValueError(f"method_args.{bad}: {why}" if bad else f"method_args: {why}") from None


def build(cfg: Any) -> Method:
    """The configured method: ``cfg.method`` with its ``method_args``, the LoRA rank (and each
    client's, with ``clients.ranks``), LoRA's alpha and the server optimizer."""
    from omegaconf import OmegaConf

    cls = method_class(cfg.method)
    args = dict(cfg.method_args) if cfg.get("method_args") else {}
    ranks = cfg.clients.get("ranks")
    if OmegaConf.is_config(ranks):
        ranks = OmegaConf.to_container(ranks)
    return cls(
        method_options(cls, args),
        lora_rank=int(cfg.lora.rank),
        server_lr=float(cfg.server.lr),
        server_momentum=float(cfg.server.momentum),
        client_ranks=None if ranks is None else client_ranks(ranks, int(cfg.clients.num), int(cfg.seed)),
        lora_alpha=float(cfg.lora.alpha),
        seed=int(cfg.seed),
    )
