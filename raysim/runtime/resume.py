"""Checkpoint and resume as the driver does them: gather the state from the server and the
workers, write it (raysim.checkpoint, no Ray), and put it back before the next round."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from raysim.checkpoint import check_resumable, find_checkpoint, read_checkpoint, write_checkpoint
from raysim.config import to_yaml

if TYPE_CHECKING:
    from raysim.runtime.simulation import Simulation

log = logging.getLogger("raysim")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (OUTPUT_DIR/checkpoints/round-N)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def read_resume(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """With ``resume``: (the checkpoint, its state), checked against this config before anything
    starts; output goes on in the resumed run's directory unless output_dir names another."""
    if not cfg.resume:
        return None, None
    path = find_checkpoint(cfg.resume)
    saved = read_checkpoint(path)
    check_resumable(saved["config"], cfg)
    if not cfg.output_dir:
        cfg.output_dir = str(run_dir_of(path))
    return path, saved


def save_checkpoint(sim: Simulation) -> Path:
    """Write everything needed to continue ``sim`` (see raysim.checkpoint); returns its directory."""
    clients: dict[int, dict] = {}
    for w in sim.live:
        try:
            clients.update(sim.backend.get(sim.workers[w].export_states.remote()))
        except sim.backend.lost:
            log.warning("checkpoint: worker %d is unavailable; its clients' local state starts over on resume", w)
    state = {
        "config": OmegaConf.to_container(sim.cfg, resolve=False),  # asset references kept: it resumes elsewhere
        "server": sim.backend.get(sim.server.state_dict.remote()),
        "clients": clients,
        "owners": dict(sim.client_worker),
        "workers": len(sim.workers),
        "budget": sim.budget.state_dict(),
        "rows": sim.rows,
        "untuned": sim.untuned,
    }
    path = write_checkpoint(sim.output_dir, sim.round, state, to_yaml(sim.cfg), sim.cfg.checkpoint.keep)
    log.info("checkpoint of round %d: %s", sim.round, path)
    return path


def restore(sim: Simulation, saved: dict[str, Any]) -> None:
    """Put a checkpoint's state back: server, every client's local state on its owner, the
    metrics so far. The privacy budget was restored before the workers were loaded."""
    get = sim.backend.get
    get(sim.server.load_state_dict.remote(saved["server"]))
    by_owner: dict[int, dict] = {}
    for cid, values in saved["clients"].items():
        by_owner.setdefault(sim.client_worker[cid], {})[cid] = values
    get([sim.workers[w].import_states.remote(states) for w, states in by_owner.items()])
    for states in by_owner.values():  # what a worker restarted before these clients train again gets back
        kept = {cid: values["method_state"] for cid, values in states.items() if values.get("method_state")}
        if kept:
            ref = sim.backend.put(kept)
            sim.method_states.update(dict.fromkeys(kept, ref))
    sim.round = saved["round"]
    sim.rows = list(saved["rows"])
    sim.untuned = saved.get("untuned")
