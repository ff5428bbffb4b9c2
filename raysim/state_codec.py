"""A checkpoint's state as JSON plus numpy arrays, so that reading one cannot run code (a pickle
can). No Ray, no torch import needed to read.

:func:`encode` splits a tree of dicts, lists, tuples, strings, numbers, None, numpy arrays and
scalars, sets of plain values (and torch tensors, stored as arrays) into a JSON-able tree and a flat dict of arrays for
``numpy.savez``; :func:`decode` is its inverse and is given only what ``numpy.load(...,
allow_pickle=False)`` and ``json.loads`` return. Values round-trip with their types: tuples and sets stay
tuples and sets, int keys stay ints, numpy scalars keep their dtype, arrays their dtype and bytes. Anything
else is refused when written (TypeError naming its path), and a malformed tree when read
(ValueError naming its path), rather than guessed at.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ARRAY, _SCALAR, _TUPLE, _SET, _ITEMS, _TENSOR = "__array__", "__scalar__", "__tuple__", "__set__", "__items__", "__tensor__"
_MARKERS = (_ARRAY, _SCALAR, _TUPLE, _SET, _ITEMS)


def encode(tree: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """(JSON-able tree, arrays by name)."""
    arrays: dict[str, np.ndarray] = {}

    def array_ref(value: np.ndarray, path: str) -> str:
        if value.dtype.hasobject:
            raise TypeError(f"{path or 'state'}: an array of Python objects cannot be stored without pickle")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return name

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, np.ndarray):
            return {_ARRAY: array_ref(value, path)}
        if isinstance(value, np.generic):  # before float: numpy's float64 is one
            return {_SCALAR: array_ref(np.asarray(value), path)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
            tensor = value.detach().cpu()
            try:
                return {_ARRAY: array_ref(tensor.numpy(), path), _TENSOR: str(tensor.dtype)}
            except TypeError:  # bfloat16 and other dtypes numpy lacks: their bits, as an int of the same width
                import torch

                bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
                return {_ARRAY: array_ref(tensor.view(bits).numpy(), path), _TENSOR: str(tensor.dtype)}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, (set, frozenset)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
            return {_SET: sorted(value, key=repr)}
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            return {_ITEMS: [[walk(k, f"{path}.key"), walk(v, f"{path}[{k!r}]")] for k, v in value.items()]}
        raise TypeError(f"{path or 'state'}: {type(value).__name__} cannot be stored in a checkpoint (arrays and plain values only)")

    return walk(tree, ""), arrays


def decode(tree: Any, arrays: Any) -> Any:
    """The inverse of :func:`encode`; ``arrays`` maps names to arrays (an open ``NpzFile`` works)."""

    def array(name: Any, path: str) -> np.ndarray:
        if not isinstance(name, str) or name not in arrays:
            raise ValueError(f"{path or 'state'}: refers to an array {name!r} that the checkpoint does not hold")
        return arrays[name]

    def walk(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            raise ValueError(f"{path or 'state'}: {type(value).__name__} is not a checkpoint value")
        marker = next((m for m in _MARKERS if m in value), None)
        if marker is None:
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        body = value[marker]
        if marker == _ARRAY:
            if _TENSOR in value:
                return _tensor(array(body, path), value[_TENSOR], path)
            return array(body, path)
        if marker == _SCALAR:
            return array(body, path)[()]
        if not isinstance(body, list):
            raise ValueError(f"{path or 'state'}: {marker} holds {type(body).__name__}, not a list")
        if marker == _TUPLE:
            return tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(body))
        if marker == _SET:
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in body):
                raise ValueError(f"{path or 'state'}: {_SET} holds other than plain values")
            return set(body)
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in body):
            raise ValueError(f"{path or 'state'}: {_ITEMS} must hold [key, value] pairs")
        return {walk(k, f"{path}.key"): walk(v, f"{path}[{k!r}]") for k, v in body}

    return walk(tree, "")


def _tensor(values: np.ndarray, dtype_name: Any, path: str) -> Any:
    import torch

    dtype = getattr(torch, str(dtype_name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path or 'state'}: {dtype_name!r} is not a torch dtype")
    tensor = torch.from_numpy(np.array(values))
    return tensor if tensor.dtype == dtype else tensor.view(dtype)
