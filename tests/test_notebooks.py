"""The notebooks under notebooks/ run top to bottom in a real Jupyter kernel, and leave no Ray behind."""

import importlib.util
import os
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 180


def notebook_client(path: Path) -> NotebookClient:
    """A client whose kernel is ipykernel's own kernelspec (with no kernel dirs, jupyter_client falls
    back to it), which runs this interpreter: never a "python3" kernel installed for another one."""
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    return NotebookClient(
        nbformat.read(path, as_version=4), km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(path.parent)}}
    )


def kernel_env() -> dict[str, str]:
    """Without RAY_ADDRESS, ray.init in the kernel starts its own local Ray: it never joins the one
    the runtime tests keep in this process (only `ray start` records an address it would join)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


class Descendants:
    """Every process seen below ``root`` while the block runs, with its command line as first seen.
    Ray's workers are children of the raylet, so they would be orphaned, not listed, once it stops:
    collect them while they live."""

    def __init__(self, root: psutil.Process, every_s: float = 0.2):
        self.root, self.every_s = root, every_s
        self.seen: dict[psutil.Process, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                continue
            for p in children:
                if p not in self.seen:
                    try:
                        self.seen[p] = " ".join(p.cmdline())[:200] or p.name()
                    except psutil.Error:
                        pass

    def __enter__(self) -> "Descendants":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self, wait_s: float = 10.0) -> list[str]:
        """Those still running after up to ``wait_s`` (a zombie has exited; is_running also rules out a reused pid)."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = [name for p, name in self.seen.items() if _running(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs_twice_in_one_kernel_and_leaks_no_ray(path):
    """Run all cells, then all again, in the same kernel (nbclient raises CellExecutionError on any
    cell error): the second start works, and afterwards Ray is off in the kernel and every process
    it started (raylet, GCS, workers) has exited."""
    client = notebook_client(path)
    missing = [m for m in client.nb.metadata.get("raysim", {}).get("needs", []) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}: pip install -e '.[llm]'")
    with client.setup_kernel(env=kernel_env(), cleanup_kc=True):
        kernel = psutil.Process(client.km.provisioner.pid)
        with Descendants(kernel) as started:
            for _ in range(2):
                for index, cell in enumerate(client.nb.cells):
                    client.execute_cell(cell, index)
        probe = nbformat.v4.new_code_cell("import ray; print(ray.is_initialized())")
        client.nb.cells.append(probe)
        client.execute_cell(probe, len(client.nb.cells) - 1)
        printed = "".join(out["text"] for out in probe.outputs if out.get("name") == "stdout")
        assert printed.strip() == "False", "Ray is still initialized in the kernel"
        assert any("raylet" in name for name in started.seen.values()), f"the kernel started no Ray of its own: {started.seen}"
        alive = started.alive()
        assert not alive, f"processes started by the notebook outlived it: {alive}"
