import os

import pytest

from raysim.config import CONFIG_DIR, load_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(tmp_path, *overrides):
    """configs/tiny.yaml with its output under tmp_path."""
    return load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every runtime test (starting Ray costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
