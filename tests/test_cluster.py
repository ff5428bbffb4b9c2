"""Running on a real Ray cluster: the files under cluster/ (no Ray), `raysim submit`'s checks, and
jobs submitted to a Ray head node started here with `ray start --head`.

The head node gets its own ports, temp dir and process group, and is killed through them: `ray
stop` would kill every Ray instance of this user, including the runtime tests' session.
"""

import collections
import copy
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from raysim.cli import main
from raysim.config import load_config
from raysim.runtime.submit import WORKING_DIR_EXCLUDES

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
# One fast round of tiny: the jobs below check the plumbing, not the learning.
FAST = ["rounds=1", "eval.max_examples=50", "worker.count=1"]


# --- the files under cluster/ ------------------------------------------------------------------


def _cluster_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {f.name for f in files} >= {"raysim-cluster.yaml", "rayjob.yaml", "runtime_env.yaml"}
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f


def test_ray_up_config_passes_ray_ups_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster_yaml("raysim-cluster.yaml")
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before touching AWS
    types = cfg["available_node_types"]
    for name, node in types.items():
        assert node["resources"].get("CPU", 0) > 0, name
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0, "the head must not take GPU work"
    gpus = sorted(node["resources"].get("GPU", 0) for name, node in types.items() if name != cfg["head_node_type"])
    assert gpus and gpus[0] >= 1 and len(set(gpus)) >= 2, "GPU worker groups of different sizes"
    assert any(types[name].get("min_workers", 0) >= 1 for name in types if name != cfg["head_node_type"])
    assert any("pip install -e ~/raysim" in c for c in cfg["setup_commands"]) and "~/raysim" in cfg["file_mounts"]


def test_rayjob_manifest_has_a_head_and_gpu_workers():
    job = _cluster_yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "raysim run" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert str(cluster["headGroupSpec"]["rayStartParams"]["num-gpus"]) == "0"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_rayjob_runtime_env_installs_raysims_dependencies():
    env = yaml.safe_load(_cluster_yaml("rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert env["working_dir"]
    installed = {re.split(r"[<>=\[ ]", req)[0].lower() for req in env["pip"]}
    with (REPO / "pyproject.toml").open("rb") as f:
        needed = {re.split(r"[<>=\[ ]", req)[0].lower() for req in tomllib.load(f)["project"]["dependencies"]}
    assert needed - {"ray"} <= installed, "Ray's image has ray; everything else must be listed"


def test_runtime_env_ships_the_working_dir_like_raysim_submit():
    env = _cluster_yaml("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert env["excludes"] == WORKING_DIR_EXCLUDES


def _raysim_commands(text: str) -> list[list[str]]:
    """The arguments after each `raysim run` / `raysim submit` in text (shell commands, comments,
    YAML values), up to the end of the command."""
    text = text.replace("\\\n", " ")
    commands = []
    for match in re.finditer(r"raysim (?:run|submit)\b([^\n`\"']*)", text):
        args = []
        for token in shlex.split(match.group(1), comments=True):
            if token in ("&&", "||", ";", "|", ">", "2>&1"):
                break
            args.append(token)
        commands.append(args)
    return commands


def _cluster_texts() -> dict[str, str]:
    texts = {f.name: f.read_text() for f in sorted(CLUSTER.iterdir()) if f.suffix in (".yaml", ".md")}
    # Folded YAML strings (a RayJob entrypoint over several lines) read as one line once parsed.
    for name, text in list(texts.items()):
        if name.endswith(".yaml"):
            texts[name + " (parsed)"] = "\n".join(_strings(yaml.safe_load(text)))
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [" ".join(value.split())]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_every_config_named_in_cluster_files_exists():
    named = set()
    for name, text in _cluster_texts().items():
        for path in re.findall(r"\bconfigs/[\w./-]+\.yaml\b", text):
            assert (REPO / path).is_file(), f"{name} names {path}, which does not exist"
            named.add(path)
    assert "configs/quickstart.yaml" in named


def test_every_raysim_command_in_cluster_files_has_a_valid_config():
    checked = []
    for name, text in _cluster_texts().items():
        for args in _raysim_commands(text):
            configs = [a for a in args if a.startswith("configs/") and a.endswith(".yaml")]
            if not configs:
                continue
            overrides = [a for a in args if re.match(r"^[a-z_][\w.]*=", a)]
            load_config(REPO / configs[0], [*overrides, "output_dir=/tmp/unused"])
            checked.append((name, configs[0], overrides))
    files = {name.split(" ")[0] for name, _, _ in checked}
    assert {"README.md", "rayjob.yaml", "raysim-cluster.yaml"} <= files, checked
    assert any("worker.num_gpus=0.5" in o for _, _, o in checked), "the GPU entrypoint is checked"


def test_command_extraction_sees_overrides_and_stops_at_the_shell():
    text = "raysim submit configs/tiny.yaml rounds=1 \\\n  worker.count=auto --address http://h:8265 && echo done=1"
    assert _raysim_commands(text) == [["configs/tiny.yaml", "rounds=1", "worker.count=auto", "--address", "http://h:8265"]]


# --- raysim submit's checks, before anything reaches a cluster ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: error:"), err
    return err[0]


def test_submit_bad_key_exits_2_before_connecting(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    # Nothing listens there: a config error reported instead shows the config is checked first.
    code = main(["submit", "configs/tiny.yaml", "no_such_key=1", "--address", f"http://127.0.0.1:{_free_port()}"])
    assert code == 2
    assert "no_such_key" in _one_error_line(capsys)


def test_submit_unreachable_address_exits_2(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    address = f"http://127.0.0.1:{_free_port()}"
    assert main(["submit", "configs/tiny.yaml", "rounds=1", "--address", address]) == 2
    assert address in _one_error_line(capsys)


def test_submit_needs_an_address(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["submit", "configs/tiny.yaml"]) == 2
    assert "--address" in _one_error_line(capsys)


def test_submit_config_outside_working_dir_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    outside = tmp_path / "tiny.yaml"
    outside.write_text((REPO / "configs" / "tiny.yaml").read_text())
    assert main(["submit", str(outside), "--address", f"http://127.0.0.1:{_free_port()}"]) == 2
    assert "inside the working directory" in _one_error_line(capsys)


# --- multi-GPU placement by Ray's own scheduler -------------------------------------------------

# Two nodes started by Ray's test cluster with GPUs declared (Ray schedules declared GPUs as it does
# real ones and sets CUDA_VISIBLE_DEVICES): the head with 2, a second node with 1. Probe actors get
# the workers' own options; each reports where Ray put it and the device raysim would pick there.
_PLACEMENT_PROBE = """
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from raysim.config import CONFIG_DIR, load_config
from raysim.runtime.placement import workers_that_fit
from raysim.runtime.cluster import worker_options

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2, num_gpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="ERROR")

@ray.remote
class Probe:
    def where(self):
        from raysim.runtime.worker import actor_device
        ctx = ray.get_runtime_context()
        return [ctx.get_node_id(), ctx.get_accelerator_ids()["GPU"], os.environ.get("CUDA_VISIBLE_DEVICES"), actor_device()]

worker = load_config(CONFIG_DIR / "tiny.yaml", ["worker.num_cpus=0.25", f"worker.num_gpus={sys.argv[1]}"]).worker
auto = workers_that_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], worker.num_cpus, worker.num_gpus)
first_two = [Probe.options(**worker_options(worker)).remote() for _ in range(2)]
first_nodes = ray.get([a.where.remote() for a in first_two], timeout=120)
rest = [Probe.options(**worker_options(worker)).remote() for _ in range(auto - 2)]
placed = first_nodes + ray.get([a.where.remote() for a in rest], timeout=120)
print(json.dumps({"auto": auto, "placed": placed, "head": ray.get_runtime_context().get_node_id()}))
ray.shutdown()
cluster.shutdown()
"""


def test_workers_fill_every_gpu_of_every_node_with_fractional_shares():
    proc = subprocess.run(
        [sys.executable, "-c", _PLACEMENT_PROBE, "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    placed = result["placed"]
    # 3 GPUs at 0.5 each hold 6 workers, and worker.count=auto starts that many.
    assert result["auto"] == 6 and len(placed) == 6
    # SPREAD: the first two workers go to different nodes, not both onto the head.
    assert placed[0][0] != placed[1][0]
    per_gpu = collections.Counter((node, tuple(gpus)) for node, gpus, _, _ in placed)
    assert sorted(per_gpu.values()) == [2, 2, 2] and len({node for node, _ in per_gpu}) == 2
    head_gpus = {gpus for node, gpus in per_gpu if node == result["head"]}
    assert head_gpus == {("0",), ("1",)}, "both of the head's GPUs are used"
    for _, gpus, visible, device in placed:
        # Ray makes the granted GPU the only visible one, so it is cuda:0 inside the actor.
        assert visible == gpus[0] and device == "cuda:0"


# --- jobs on a real head node ------------------------------------------------------------------


def _free_port_range(size: int) -> int:
    """First port of ``size`` free ones, below Linux's ephemeral range and above Ray's default
    worker ports (10002-19999), so other Ray instances on this machine keep theirs."""
    for _ in range(50):
        first = random.randrange(20000, 32000 - size)
        try:
            for port in range(first, first + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free port range")


def _wait_for_job_server(url: str, head: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the job server at {url} did not come up:\n{log.read_text()[-3000:]}")


def _kill_tree(head: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the head's process group and every descendant (Ray's workers start their own
    process groups); the processes that were killed."""
    try:
        procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    head.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)
    return procs


def _processes_using(temp_dir: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc.info["pid"])
    return found


@pytest.fixture(scope="module")
def head_node():
    """A Ray head node on 127.0.0.1 with 2 CPUs and the Jobs API; yields its job server URL."""
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # unix socket paths must stay < 108 chars
    dashboard = _free_port()
    workers = _free_port_range(100)
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--min-worker-port": workers,
        "--max-worker-port": workers + 99,
    }
    command = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    command += [str(a) for item in ports.items() for a in item]
    command += ["--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir]
    command += ["--object-store-memory", str(300 * 2**20)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Token auth (on by default where ~/.ray/auth_token exists) is Ray's business, not this test's.
    env.update(RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    log = Path(temp_dir) / "ray-start.log"
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(url, head, log)
        yield url
    finally:
        killed = _kill_tree(head)
        assert killed and not [p.pid for p in killed if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not _processes_using(temp_dir), "head node processes left behind"
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _check_outputs(out: Path) -> None:
    assert pq.read_table(out / "metrics.parquet").num_rows == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0 <= summary["final_eval_accuracy"] <= 1
    assert (out / "adapter" / "adapter_config.json").is_file()


def _popen_logged(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def test_jobs_on_a_head_node(head_node, tmp_path, capsys, monkeypatch, tiny_lm):
    """Jobs at once, to keep the test short: one through Ray's own CLI and cluster/runtime_env.yaml,
    a `raysim submit` that fails on the cluster, one interrupted with Ctrl-C, one that succeeds,
    and one that instruction-tunes a causal LM."""
    monkeypatch.chdir(REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    ray_cli_log, failing_log = tmp_path / "ray-cli.log", tmp_path / "failing.log"
    ray_cli = _popen_logged(
        ["ray", "job", "submit", "--address", head_node, "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "-m", "raysim", "run", "--quiet", "configs/tiny.yaml", *FAST, f"output_dir={tmp_path / 'ray-cli'}"],
        ray_cli_log, env,
    )
    # Valid here, refused on the cluster: an output_dir that exists and is not empty.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep").write_text("")
    failing = _popen_logged(
        ["raysim", "submit", "configs/tiny.yaml", *FAST, f"output_dir={taken}", "--address", head_node], failing_log, env
    )
    causal_log, causal_out = tmp_path / "causal.log", tmp_path / "causal"
    causal = _popen_logged(
        ["raysim", "submit", "configs/tiny.yaml", *tiny_lm, *FAST, "eval.generate_examples=6", f"output_dir={causal_out}", "--address", head_node],
        causal_log, env,
    )
    # Ctrl-C's default action, even when pytest runs where SIGINT is ignored (under nohup, say),
    # which a child would inherit and Python would then never raise KeyboardInterrupt.
    interrupted = subprocess.Popen(
        ["raysim", "submit", "configs/tiny.yaml", *FAST, f"output_dir={tmp_path / 'interrupted'}", "--address", head_node],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    submitted = next((line for line in interrupted.stderr if line.startswith("raysim: submitted job")), "")
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=30)
    assert submitted, err[-2000:]
    job_id = submitted.split()[3]
    assert interrupted.returncode == 130 and f"ray job stop --address {head_node} {job_id}" in err, err[-2000:]
    client = JobSubmissionClient(head_node)
    assert not client.get_job_status(job_id).is_terminal(), "Ctrl-C must not stop the job"
    client.stop_job(job_id)

    code = main(["submit", "configs/tiny.yaml", *FAST, f"output_dir={tmp_path / 'submit'}", "--address", head_node])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "SUCCEEDED" in captured.err and f"outputs: {tmp_path / 'submit'}" in captured.err
    assert "round" in captured.out  # the job's log lines, streamed
    _check_outputs(tmp_path / "submit")

    assert failing.wait(timeout=180) == 1, failing_log.read_text()[-3000:]
    assert "FAILED" in failing_log.read_text() and "already exists and is not empty" in failing_log.read_text()

    assert causal.wait(timeout=180) == 0, causal_log.read_text()[-3000:]
    _check_outputs(causal_out)
    summary = json.loads((causal_out / "summary.json").read_text())
    predictions = [json.loads(line) for line in (causal_out / "predictions.jsonl").read_text().splitlines()]
    assert summary["task"] == "causal_lm" and len(predictions) == summary["final_eval_examples"] == 6
    assert summary["final_eval_accuracy"] == sum(p["correct"] for p in predictions) / 6

    assert ray_cli.wait(timeout=180) == 0, ray_cli_log.read_text()[-3000:]
    assert "succeeded" in ray_cli_log.read_text().lower()
    _check_outputs(tmp_path / "ray-cli")

    assert main(["submit", "configs/tiny.yaml", *FAST, f"output_dir={tmp_path / 'later'}", "--address", head_node, "--no-wait"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert client.get_job_info(job_id).entrypoint.startswith("python -m raysim run --quiet configs/tiny.yaml")
    client.stop_job(job_id)
