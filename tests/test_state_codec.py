"""A checkpoint's state through JSON and npz: every value back with its type, nothing that needs pickle."""

import json
import math

import numpy as np
import pytest
import torch

from raysim.state_codec import decode, encode


def _through_files(tree, tmp_path):
    """What a checkpoint does: JSON text, and arrays through numpy's npz without pickle."""
    encoded, arrays = encode(tree)
    np.savez(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        return decode(json.loads(json.dumps(encoded)), {k: npz[k] for k in npz.files})


def test_values_come_back_with_their_types(tmp_path):
    rng = np.random.default_rng(5)
    tree = {
        "rng": rng.bit_generator.state,  # 128-bit integers
        "history": [(1.1, 0.2, 5), (0.9, 0.1, 3)],
        "by_client": {0: {"m": np.arange(6, dtype=np.float32).reshape(2, 3)}, 17: {"m": np.zeros(0, dtype=np.int64)}},
        "scalar": np.float64(0.25),
        "count": np.int32(-4),
        "flag": np.bool_(True),
        "nan": float("nan"),
        "tensor": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "step": torch.tensor(3.0),
        "__array__": "a plain key that looks like a marker",
        "none": None,
        "text": "ok",
        "exhausted": {3, 11},
    }
    back = _through_files(tree, tmp_path)
    assert back["rng"] == tree["rng"]
    assert back["history"] == tree["history"] and all(type(h) is tuple for h in back["history"])
    assert sorted(back["by_client"]) == [0, 17]
    assert back["by_client"][0]["m"].dtype == np.float32 and back["by_client"][0]["m"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["by_client"][17]["m"].dtype == np.int64 and back["by_client"][17]["m"].shape == (0,)
    assert type(back["scalar"]) is np.float64 and back["scalar"] == 0.25
    assert type(back["count"]) is np.int32 and back["count"] == -4
    assert type(back["flag"]) is np.bool_ and back["flag"]
    assert math.isnan(back["nan"])
    assert back["tensor"].dtype == torch.bfloat16 and back["tensor"].tolist() == [1.5, -2.0]
    assert back["step"].dtype == torch.float32 and back["step"].item() == 3.0
    assert back["exhausted"] == {3, 11} and type(back["exhausted"]) is set
    assert back["__array__"] == tree["__array__"] and back["none"] is None and back["text"] == "ok"
    # The RNG continues where it was.
    restored = np.random.default_rng()
    restored.bit_generator.state = back["rng"]
    assert restored.random(4).tolist() == rng.random(4).tolist()


@pytest.mark.parametrize("value", [object(), {(1, 2)}, np.array([None, 1], dtype=object), b"bytes"], ids=["object", "set", "object-array", "bytes"])
def test_values_that_would_need_pickle_are_refused_with_their_path(value):
    with pytest.raises(TypeError, match=r"clients\[3\]\.extra"):
        encode({"clients": {3: {"extra": value}}})


def test_a_malformed_tree_is_refused_with_its_path():
    with pytest.raises(ValueError, match=r"server\.b: refers to an array 'a1'"):
        decode({"server": {"b": {"__array__": "a1"}}}, {"a0": np.zeros(1)})
    with pytest.raises(ValueError, match=r"x: 'nonsense' is not a torch dtype"):
        decode({"x": {"__array__": "a0", "__tensor__": "nonsense"}}, {"a0": np.zeros(1)})
    with pytest.raises(ValueError, match="__items__ must hold"):
        decode({"__items__": [[1, 2, 3]]}, {})
