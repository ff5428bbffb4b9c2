"""The model's tokenizer, for the driver: token ids only, without torch where the model allows.

transformers 5 imports torch to load any tokenizer or model config (1.7 s here), and the driver
only turns texts into ids. A model that ships ``tokenizer.json`` (every fast tokenizer on the Hub)
is read straight into the ``tokenizers`` library, the Rust tokenizer transformers wraps. For
MiniLM the ids equal ``AutoTokenizer``'s (a test checks the tweets), but transformers may adjust
the file's tokenizer from ``tokenizer_config.json`` (BERT's ``do_lower_case`` does), so a worker,
which has transformers loaded anyway, compares a sample against ``AutoTokenizer`` and the driver
tokenizes again with it if they differ. Without ``tokenizer.json``, ``AutoTokenizer`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence


class Tokenizer:
    """Token ids for texts, truncated to a maximum length; the id padding takes; and whether it
    was read from tokenizer.json without transformers."""

    def __init__(self, encode: Callable[[list[str], int], list[list[int]]], pad_token_id: int, from_file: bool):
        self._encode = encode
        self.pad_token_id = pad_token_id
        self.from_file = from_file

    def __call__(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        return self._encode(list(texts), max_length)


def load_tokenizer(name_or_path: str, read_file: bool = True) -> Tokenizer:
    """The tokenizer of a local model directory or a Hub model (from the local cache, else as
    transformers would get it); with ``read_file=False`` always through AutoTokenizer. A
    UserError naming ``model.name_or_path`` if there is none."""
    tokenizer_file = local_file(name_or_path, "tokenizer.json") if read_file else None
    if tokenizer_file is not None:
        from tokenizers import Tokenizer as RustTokenizer

        core = RustTokenizer.from_file(str(tokenizer_file))
        return _from_rust(core, _pad_token_id(name_or_path, core), from_file=True)
    return _from_transformers(name_or_path)


def _from_rust(core, pad_token_id: int | None, from_file: bool) -> Tokenizer:
    core.no_padding()

    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        core.enable_truncation(max_length)
        batch = getattr(core, "encode_batch_fast", core.encode_batch)  # no offsets: half the time
        return [e.ids for e in batch(texts)]

    return Tokenizer(encode, pad_token_id or 0, from_file)


def _from_transformers(name_or_path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    from raysim.model import quiet_load

    hf = quiet_load("a tokenizer from", name_or_path, lambda: AutoTokenizer.from_pretrained(name_or_path))
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer as RustTokenizer

        return _from_rust(RustTokenizer.from_str(backend.to_str()), hf.pad_token_id, from_file=False)
    return Tokenizer(lambda texts, n: hf(texts, truncation=True, max_length=n)["input_ids"], hf.pad_token_id or 0, from_file=False)


def local_file(name_or_path: str, filename: str) -> Path | None:
    """``filename`` of a model directory, or of a Hub model already in the local cache."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name_or_path, filename)
    except ValueError:  # not a valid Hub id
        return None
    return Path(found) if isinstance(found, str) else None


def _pad_token_id(name_or_path: str, core) -> int | None:
    """The pad token's id, named as transformers reads it: tokenizer_config.json, then
    special_tokens_map.json (a token string, or a dict with its "content")."""
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        path = local_file(name_or_path, filename)
        if path is None:
            continue
        token = json.loads(path.read_text()).get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
        if token:
            return core.token_to_id(token)
    return None
