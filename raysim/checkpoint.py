"""Checkpoints: everything a run needs to continue, written so that a crash never costs the last
good one. No Ray here; :class:`raysim.Simulation` gathers the state and calls these functions.

Layout: ``OUTPUT_DIR/checkpoints/round-000004/`` holds ``state.pkl`` (server, clients and their
owners, privacy budget, metrics so far; sampling is drawn from (seed, round) and needs no state)
and ``config.yaml`` (for people). A checkpoint is written into a hidden ``.partial-*`` directory
and renamed into place only when complete; the newest complete ``round-*`` directory is the one
to resume from. ``state.pkl`` is a pickle, like ``torch.load``'s default files: resume only from
checkpoints you wrote.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raysim.config import ConfigError, UserError, flatten

FORMAT = 2  # 2: the server's state is the method protocol's ServerState
STATE_FILE = "state.pkl"
_PREFIX = "round-"

# Keys a resumed run may change. Everything else defines the run (model, data, clients, method,
# seed, privacy, secure aggregation, server optimizer) and must equal the checkpoint's.
CHANGEABLE_ON_RESUME = (
    "output_dir",
    "overwrite",
    "rounds",
    "resume",
    "checkpoint",
    "ray",
    "runtime",
    "worker",
    "eval",
    "train.lr",
    "train.lr_decay",
    "train.local_steps",
    "train.batch_size",
    "train.weighting",
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, round_idx: int, state: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Write round ``round_idx``'s checkpoint under ``run_dir/checkpoints`` and delete all but the
    ``keep`` newest. Returns its directory."""
    root = Path(run_dir) / "checkpoints"
    name = f"{_PREFIX}{round_idx:06d}"
    final, partial, stale = root / name, root / f".partial-{name}", root / f".stale-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with open(partial / STATE_FILE, "wb") as f:
        pickle.dump({"format": FORMAT, "round": round_idx, **state}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    (partial / "config.yaml").write_text(config_yaml)
    _fsync_dir(partial)
    if final.exists():  # the same round again (a resumed run): set the old one aside until the new one is in place
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(partial, final)
    _fsync_dir(root)
    shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".partial-*"):  # from writes that were interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a rename makes a checkpoint appear only once whole)."""
    found = {}
    for path in root.glob(f"*{_PREFIX}*"):
        if path.name.startswith(".partial-") or not (path / STATE_FILE).is_file():
            continue
        number = path.name.rsplit(_PREFIX, 1)[1]
        if number.isdigit() and (int(number) not in found or not path.name.startswith(".stale-")):
            found[int(number)] = path
    return [found[n] for n in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest one of a run directory or of
    its ``checkpoints/`` directory. UserError naming ``resume`` when there is none."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = _complete(root) if root.is_dir() else []
        if found:
            return found[-1]
    if not path.exists():
        raise UserError(f"resume: '{path}' does not exist")
    raise UserError(f"resume: no checkpoint in '{path}' (a run writes them with checkpoint.every=N)")


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with open(path / STATE_FILE, "rb") as f:
            state = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
        raise UserError(f"resume: cannot read '{path / STATE_FILE}': {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"resume: '{path}' is not a raysim checkpoint of format {FORMAT}")
    return state


def check_resumable(saved: dict, cfg: DictConfig) -> None:
    """ConfigError naming the first key that defines the run and differs from the checkpoint's."""
    before, now = flatten(saved), flatten(OmegaConf.to_container(cfg, resolve=True))
    for key in sorted(set(before) | set(now)):
        if any(key == c or key.startswith(f"{c}.") for c in CHANGEABLE_ON_RESUME):
            continue
        if before.get(key) != now.get(key):
            raise ConfigError(
                f"{key}: {now.get(key)!r} here but {before.get(key)!r} in the checkpoint; a resumed run keeps the "
                f"keys that define it (changeable: {', '.join(CHANGEABLE_ON_RESUME)})"
            )
