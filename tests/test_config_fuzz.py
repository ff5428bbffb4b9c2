"""Random values for every config key: load_config accepts them or refuses them with one line
that names a key, never with another exception (a traceback for the user)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from raysim.config import CONFIG_DIR, ConfigError, flatten, load_config

TINY = CONFIG_DIR / "tiny.yaml"
DEFAULTS = flatten(OmegaConf.to_container(load_config(TINY, ["output_dir=/nonexistent/unused"]), resolve=True))
KEYS = sorted(DEFAULTS)
SECTIONS = {k.rsplit(".", 1)[0] for k in KEYS if "." in k}


def _rendered(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, dict)):
        return str(value).replace("'", "")
    return str(value)


values = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.one_of(st.integers(-5, 5), st.text("abc", max_size=3)), max_size=3),
    st.sampled_from(["", "null", "auto", "-1", "0", "1e9", "${oops}", "${raysim.nothing:}", "{a: 1}", "[1, [2]]", "'", '"', "a=b"]),
).map(_rendered)


def _names_a_key(message: str, key: str) -> bool:
    head = message.split(":", 1)[0].strip()
    return key in message or head in DEFAULTS or head in SECTIONS or any(k in message for k in KEYS)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_for_any_key_is_accepted_or_refused_in_one_line(key, value, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    try:
        load_config(TINY, [f"output_dir={out}", f"{key}={value}"] if key != "output_dir" else [f"{key}={value}"])
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message, repr(message)
        assert _names_a_key(message, key), message
    assert not out.exists()  # loading a config writes nothing


@pytest.mark.parametrize("override", ["rounds=abc", "train.lr=-1", "worker.min_count=0", "nonsense.key=1", "output_dir=/proc/forbidden/run"])
def test_the_cli_refuses_a_bad_value_with_exit_2_and_writes_nothing(tmp_path, capsys, override):
    from raysim.cli import main

    assert main(["run", str(TINY), "runtime=local", f"output_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysim: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
