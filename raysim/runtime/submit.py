"""``raysim submit``: run ``raysim run`` as a Ray job on a running cluster.

The config is checked here first, so a typo fails in a second rather than after an upload and a
job start. The job runs the uploaded copy of the working directory (its ``raysim`` code and
configs); the cluster's nodes only need raysim's dependencies installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, cast

from omegaconf import DictConfig, OmegaConf
from ray.exceptions import AuthenticationError, RayError
from ray.job_submission import JobSubmissionClient

from raysim.config import UserError, load_config

# Left out of the upload (Ray also honours .gitignore and .rayignore): outputs, VCS data, caches,
# benchmark results. cluster/runtime_env.yaml lists the same patterns for `ray job submit`.
WORKING_DIR_EXCLUDES = [
    "runs/",
    "studies/",
    "reports/",
    ".git/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".benchmarks/",
    "benchmarks/results-*",
    ".ipynb_checkpoints/",
]

# Ray lets these override any address given to JobSubmissionClient; an explicit --address must win.
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def default_address() -> str | None:
    """The job server address Ray's own CLI would use."""
    return next((os.environ[v] for v in _ADDRESS_VARIABLES if os.environ.get(v)), None)


def entrypoint(config_in_job: str, overrides: list[str]) -> str:
    """The job's shell command. ``python -m`` needs no raysim installed on the nodes (only its
    dependencies): the job's working directory, the upload, comes first on its PYTHONPATH."""
    return shlex.join(["python", "-m", "raysim", "run", "--quiet", config_in_job, *overrides])


def submit(config: str, overrides: list[str], address: str | None, working_dir: str = ".", wait: bool = True) -> int:
    """Submit ``raysim run CONFIG overrides`` to the cluster at ``address``; with ``wait``, stream
    its logs and return 0 if it succeeded, 1 if it failed or was stopped."""
    if not address:
        raise UserError("--address: give the cluster's job server, e.g. http://HEAD:8265 (or set RAY_ADDRESS)")
    cfg = load_config(config, overrides)
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise UserError(f"--working-dir: not a directory: {working_dir}")
    try:
        config_in_job = Path(config).resolve().relative_to(root).as_posix()
    except ValueError:
        raise UserError(f"{config}: the config must be inside the working directory ({root}), which is what the job gets") from None
    overrides = list(overrides)
    if not _sets_output_dir(config, overrides):
        # Pin the default name (it has a timestamp) so it can be printed here.
        overrides.append(f"output_dir={cfg.output_dir}")

    client = _connect(address)
    runtime_env = {"working_dir": str(root), "excludes": WORKING_DIR_EXCLUDES}
    try:
        job_id = client.submit_job(entrypoint=entrypoint(config_in_job, overrides), runtime_env=runtime_env)
    except (OSError, RuntimeError, ValueError, RayError) as err:  # e.g. an upload too large, a refused request
        raise UserError(f"submitting to {address} failed: {_first_line(err)}") from None
    try:
        _note(f"submitted job {job_id} to {address}")
        _note(f"outputs: {_where(cfg.output_dir)}")
        if not wait:
            print(job_id)
            _note(f"follow it with: ray job logs -f --address {address} {job_id}")
            return 0
        asyncio.run(_stream_logs(client, job_id))
        status = _final_status(client, job_id)
        info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        _note(f"stopped following job {job_id}; it keeps running. Stop it with: ray job stop --address {address} {job_id}")
        return 130
    _note(f"job {job_id} {status}" + (f": {info.message}" if info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


def _connect(address: str) -> JobSubmissionClient:
    try:
        with _only_argument_address():
            return JobSubmissionClient(address)
    except AuthenticationError:
        raise UserError(
            f"--address: {address} requires a Ray auth token: set RAY_AUTH_MODE=token and put the "
            "cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
        ) from None
    except (OSError, RuntimeError, ValueError, RayError) as err:
        raise UserError(f"--address: cannot reach a Ray job server at {address}: {_first_line(err)}") from None


@contextlib.contextmanager
def _only_argument_address() -> Iterator[None]:
    saved = {v: os.environ.pop(v) for v in _ADDRESS_VARIABLES if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _sets_output_dir(config: str, overrides: list[str]) -> bool:
    return any(o.startswith("output_dir=") for o in overrides) or bool(cast(DictConfig, OmegaConf.load(config)).get("output_dir"))


async def _stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    try:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except RuntimeError as err:  # the log stream broke; the job itself may be fine
        _note(f"lost the log stream ({_first_line(err)}); waiting for the job to finish")


def _final_status(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0) -> str:
    """The log stream ends when the job does, but its status may lag a moment behind."""
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return str(status)


def _where(output_dir: str) -> str:
    if Path(output_dir).is_absolute():
        return f"{output_dir} on the node that runs the job (the head node)"
    return (
        f"{output_dir} under the job's working directory on the head node, which Ray deletes later; "
        "set output_dir to shared storage to keep them"
    )


def _note(message: str) -> None:
    print(f"raysim: {message}", file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
