"""Checkpoints: everything a run needs to continue, written so that a crash never costs the last
good one. No Ray here; :class:`raysim.Simulation` gathers the state and calls these functions.

Layout: ``OUTPUT_DIR/checkpoints/round-000004/`` holds ``state.json`` (format, round, and the
state: server, clients and their owners, privacy budget, metrics so far; sampling is drawn from
(seed, round) and needs no state) with its arrays in ``arrays.npz`` (raysim.state_codec), and
``config.yaml`` (for people). Reading one runs no code: JSON, and arrays loaded without pickle;
its format and the state's shape are checked before anything is used. A checkpoint is written
into a hidden ``.partial-*`` directory and renamed into place only when complete; the newest
complete ``round-*`` directory is the one to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from raysim.config import ConfigError, UserError, differing_keys, flatten
from raysim.state_codec import decode, encode

FORMAT = 3  # 3: JSON and npz (2, a pickle, is no longer read); 2: the server's state is the method protocol's ServerState
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
LEGACY_FILE = "state.pkl"
# The state's parts and their types, checked before a resume uses any of it.
SCHEMA: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "server": (dict,),
    "clients": (dict,),
    "owners": (dict,),
    "workers": (int,),
    "budget": (dict,),
    "rows": (list,),
    "untuned": (dict, type(None)),
}
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
    tree, arrays = encode(state)
    try:
        _write_partial(partial, round_idx, tree, arrays, config_yaml)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"checkpoint: cannot write '{partial}' ({err.strerror or err}); the last complete checkpoint is intact") from None
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


def _write_partial(partial: Path, round_idx: int, tree: Any, arrays: dict[str, np.ndarray], config_yaml: str) -> None:
    partial.mkdir(parents=True)
    with open(partial / ARRAYS_FILE, "wb") as f:
        save_arrays: Any = np.savez  # numpy's stubs read **arrays as its allow_pickle flag
        save_arrays(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    with open(partial / STATE_FILE, "w") as f:
        json.dump({"format": FORMAT, "round": round_idx, "state": tree}, f)
        f.flush()
        os.fsync(f.fileno())
    (partial / "config.yaml").write_text(config_yaml)
    _fsync_dir(partial)


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
    its ``checkpoints/`` directory. UserError naming ``resume`` when there is none, or when there
    are only checkpoints of an earlier format."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = _complete(root) if root.is_dir() else []
        if found:
            return found[-1]
    if not path.exists():
        raise UserError(f"resume: '{path}' does not exist")
    legacy = [p for p in (path, *path.glob(f"*{_PREFIX}*"), *path.glob(f"checkpoints/{_PREFIX}*")) if (p / LEGACY_FILE).is_file()]
    if legacy:
        raise UserError(
            f"resume: '{legacy[-1] / LEGACY_FILE}' is an earlier raysim's checkpoint (a pickle, which can run code when read); "
            f"this version reads only {STATE_FILE} + {ARRAYS_FILE} (format {FORMAT}): start the run again"
        )
    raise UserError(f"resume: no checkpoint in '{path}' (a run writes them with checkpoint.every=N)")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state written by :func:`write_checkpoint`, with ``format`` and ``round``. UserError
    naming the file and what is wrong for a corrupt, foreign or other-format checkpoint."""
    state_file, arrays_file = path / STATE_FILE, path / ARRAYS_FILE
    try:
        saved = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"resume: cannot read '{state_file}': {err}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("format"), int):
        raise UserError(f"resume: '{state_file}' is not a raysim checkpoint (no format number)")
    if saved["format"] != FORMAT:
        raise UserError(f"resume: '{state_file}' has format {saved['format']}; this raysim reads format {FORMAT}")
    tree, round_idx = saved.get("state"), saved.get("round")
    if not isinstance(round_idx, int) or round_idx < 0 or not isinstance(tree, dict):
        raise UserError(f"resume: '{state_file}' lacks its round or its state")
    try:
        with np.load(arrays_file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"resume: cannot read '{arrays_file}': {err}") from None
    try:
        state = decode(tree, arrays)
    except ValueError as err:
        raise UserError(f"resume: '{state_file}': {err}") from None
    for key, types in SCHEMA.items():
        if key not in state:
            raise UserError(f"resume: '{state_file}' has no '{key}'")
        if not isinstance(state[key], types):
            raise UserError(f"resume: '{state_file}': '{key}' is a {type(state[key]).__name__}, not a {types[0].__name__}")
    missing = [k for k in ("adapter", "frozen", "optimizer", "extra") if not isinstance(state["server"].get(k), dict)]
    if missing:
        raise UserError(f"resume: '{state_file}': the server's state lacks {', '.join(missing)}")
    return {"format": FORMAT, "round": round_idx, **state}


def check_resumable(saved: dict, cfg: DictConfig) -> None:
    """ConfigError naming the first key that defines the run and differs from the checkpoint's."""
    for key, before, now in differing_keys(flatten(saved), cfg):
        if any(key == c or key.startswith(f"{c}.") for c in CHANGEABLE_ON_RESUME):
            continue
        raise ConfigError(
            f"{key}: {now!r} here but {before!r} in the checkpoint; a resumed run keeps the "
            f"keys that define it (changeable: {', '.join(CHANGEABLE_ON_RESUME)})"
        )
