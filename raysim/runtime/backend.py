"""Where a simulation's actors live: Ray actors (``runtime: ray``) or objects in this process
(``runtime: local``), behind one interface, so the driver's round is the same code on both.

An actor handle's method is called as in Ray, ``handle.method.remote(*args)`` (or
``handle.method.options(num_returns=k).remote(...)``), and returns references that
:meth:`Backend.get` resolves. The local backend runs the call at once and keeps its result (or
the exception it raised, re-raised by ``get``, as Ray does), so a breakpoint inside a client's
step works, and the runtime tests have an oracle that shares no Ray machinery.
"""

from __future__ import annotations

from typing import Any, Callable


class WorkerLost(Exception):
    """A worker (or the server) died or is restarting: what Ray's actor errors mean to the driver."""


class LocalRef:
    """A finished call's result, or the exception it raised."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error


def _resolve(value: Any) -> Any:
    """Top-level arguments that are references are passed as their values, as Ray does."""
    if isinstance(value, LocalRef):
        if value.error is not None:
            raise value.error
        return value.value
    return value


class _LocalMethod:
    def __init__(self, target: Any, name: str, num_returns: int = 1):
        self.target, self.name, self.num_returns = target, name, num_returns

    def options(self, num_returns: int = 1) -> "_LocalMethod":
        return _LocalMethod(self.target, self.name, num_returns)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = getattr(self.target, self.name)(*map(_resolve, args), **{k: _resolve(v) for k, v in kwargs.items()})
        except Exception as err:  # kept for get(), as Ray keeps a task's error
            return LocalRef(error=err) if self.num_returns == 1 else [LocalRef(error=err)] * self.num_returns
        if self.num_returns == 1:
            return LocalRef(result)
        return [LocalRef(part) for part in result]


class LocalActor:
    """An object whose methods are called as a Ray actor's. ``num_returns``: the methods that, as
    the Ray actor declares them, return several references."""

    def __init__(self, target: Any, num_returns: dict[str, int] | None = None):
        self._target = target
        self._num_returns = num_returns or {}

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        return _LocalMethod(self._target, name, self._num_returns.get(name, 1))


class LocalBackend:
    """Every actor an object of this process; ``put`` keeps the value; nothing ever dies."""

    name = "local"
    lost: tuple[type[BaseException], ...] = (WorkerLost,)
    timed_out: tuple[type[BaseException], ...] = ()  # a call here returns when it is done

    def __init__(self) -> None:
        self._threads: int | None = None  # torch's threads before the workers set theirs

    def put(self, value: Any) -> Any:
        return LocalRef(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        return _resolve(refs)

    def actor(self, cls: type, *args: Any, **options: Any) -> LocalActor:
        return LocalActor(cls(*args))

    def worker(self, cfg: dict, index: int, num_labels: int) -> LocalActor:
        """A client host in this process, on the GPU where one is asked for and present."""
        import torch

        from raysim.runtime.host import ClientHost

        device = "cuda:0" if cfg["worker"]["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        if self._threads is None:
            self._threads = torch.get_num_threads()
        threads = int(cfg["worker"]["num_cpus"])  # as a Ray worker has: the same kernels, the same sums
        return LocalActor(ClientHost(cfg, index, num_labels, device, threads), ClientHost.NUM_RETURNS)

    def started(self) -> None:
        """The workers were built as they were created: nothing to wait for."""

    def kill(self, actor: Any) -> None:
        pass

    def restart(self, actor: Any) -> None:
        pass

    def close(self) -> None:
        """Give this process back the torch threads it had before the workers set theirs."""
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
            self._threads = None

    def object_putter(self) -> Callable[[Any], Any] | None:
        return None


class RayBackend:
    """Ray actors and Ray's object store; Ray's actor errors become :class:`WorkerLost`."""

    name = "ray"

    def __init__(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self._ray = ray
        self.lost: tuple[type[BaseException], ...] = (RayActorError,)
        self.timed_out: tuple[type[BaseException], ...] = (GetTimeoutError,)
        self._starting: list[Any] = []  # the new workers' start calls

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        return self._ray.get(refs, timeout=timeout)

    def actor(self, cls: type, *args: Any, **options: Any) -> Any:
        return self._ray.remote(cls).options(**options).remote(*args)

    def worker(self, cfg: dict, index: int, num_labels: int) -> Any:
        """A ClientWorker actor placed as worker.* says (see raysim.runtime.cluster.worker_options)."""
        from omegaconf import OmegaConf

        from raysim.runtime.cluster import worker_options
        from raysim.runtime.worker import ClientWorker

        actor_class: Any = ClientWorker  # a Ray actor class: .options() is Ray's
        handle = actor_class.options(**worker_options(OmegaConf.create(cfg["worker"]))).remote(cfg, index, num_labels)
        self._starting.append(handle.start.remote())
        return handle

    def started(self) -> None:
        """Wait for the new workers' hosts; a UserError one raised comes as itself (the cause of
        Ray's task error), as an error in an actor's constructor would not."""
        starting, self._starting = self._starting, []
        self._ray.get(starting)

    def kill(self, actor: Any) -> None:
        self._ray.kill(actor, no_restart=True)

    def restart(self, actor: Any) -> None:
        """Kill a hung actor's process; Ray restarts it if its max_restarts allows."""
        self._ray.kill(actor, no_restart=False)

    def close(self) -> None:
        pass

    def object_putter(self) -> Callable[[Any], Any] | None:
        return self._ray.put
