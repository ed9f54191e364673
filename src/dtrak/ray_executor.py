"""Ray as the executor of the farms (``runtime.executor = "ray"``): one machine or a cluster.

Every farm of independent jobs (LDS subset models, model pools, counterfactual retrainings,
featurization shards) hands its :class:`dtrak.farm.Job` list to an executor. This one submits
each unfinished job as a Ray task with ``runtime.num_cpus`` CPUs and ``runtime.num_gpus`` GPUs
(the worker's torch threads = its CPUs) and waits for all of them behind one progress bar.

- ``runtime.ray_address = None`` starts a local Ray on this machine (the CPUs of
  ``runtime.workers`` jobs, no dashboard, a small object store: jobs pass paths, not tensors), reused by later farms
  of the same process and stopped when it exits; ``"auto"``, ``"HOST:PORT"`` or
  ``"ray://HOST:PORT"`` joins a running cluster, which is never shut down from here.
- A job whose worker dies (killed, out of memory, node lost) is retried by Ray
  (:data:`MAX_RETRIES` times) and resumes from its own checkpoints; an exception raised by the
  job itself is not retried. Finished jobs (their ``done_file`` exists) are never submitted.
- Every node must see the run directory and the data at the same paths (shared storage), and
  run the same dtrak; relative paths resolve against the submitting process's directory.

Ray is optional (``pip install "dtrak[ray]"``): it is imported when a farm first runs on it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from .config import ConfigError, RuntimeConfig
from .runtime import set_threads

log = logging.getLogger(__name__)

__all__ = ["MAX_RETRIES", "RayExecutor", "connect", "shutdown"]

#: Retries of a job whose worker died (Ray's ``max_retries``); its own exceptions are final.
MAX_RETRIES = 3
#: Object store of a local Ray: jobs pass paths and return small dicts, so it stays small.
OBJECT_STORE_BYTES = 128 * 1024**2
#: Seconds to wait for a cluster's address to answer before saying it does not.
CONNECT_TIMEOUT_S = 10
INSTALL_HINT = 'runtime.executor = "ray" needs Ray: pip install "dtrak[ray]"'
# A local Ray without phoning home, and without the warning that it turned on token
# authentication (Ray's default for a new local cluster: it stays on).
_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_started_here = False  # whether this process started the Ray it is connected to


def _import_ray() -> Any:
    try:
        import ray  # optional dependency: only a farm that runs on Ray needs it
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return ray


def connect(address: str | None = None, num_cpus: int = 1) -> Any:
    """Ray, initialised: the one this process is connected to, else a new local one with
    ``num_cpus`` CPUs (``address`` None), else the cluster at ``address``."""
    global _started_here
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    if address is None:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        logging.getLogger(_AUTH_LOGGER).setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
                 logging_level=logging.WARNING)
        _started_here = True
        log.info("started a local Ray with %d CPUs", num_cpus)
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address != "auto":  # Ray waits on an unreachable address for minutes: ask first
            host, port = address.removeprefix("ray://").rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (OSError, RuntimeError, ValueError, ImportError) as e:  # OSError: ConnectionError
        raise ConfigError(
            f"runtime.ray_address: cannot join the Ray cluster at {address!r} ({e}); start "
            "it with `ray start --head` (and `ray start --address=HEAD:6379` on the other "
            "nodes), or leave ray_address unset for a local Ray"
            + ("" if address == "auto" else "; a cluster with token authentication (Ray's "
               "default) needs RAY_AUTH_MODE=token and its token (~/.ray/auth_token or "
               "RAY_AUTH_TOKEN) in this environment")
            + ("; ray:// addresses need `pip install \"ray[client]\"`"
               if address.startswith("ray://") else "")
        ) from e
    _started_here = False
    return ray


def shutdown() -> None:
    """Stop the local Ray this process started (a joined cluster is left running)."""
    global _started_here
    if _started_here:
        ray = _import_ray()
        if ray.is_initialized():
            ray.shutdown()
        _started_here = False


_TALLY_START_S = 120.0  # seconds to wait for the tally actor to start
_TALLY_CALL_S = 60.0  # and for one call to it (generous: a loaded machine is slow, not broken)


class _Tally:
    """Attempts per job (a Ray actor): a job started twice was retried once."""

    def __init__(self) -> None:
        self.starts: dict[str, dict[str, int]] = {}

    def started(self, key: str, name: str) -> None:
        runs = self.starts.setdefault(key, {})
        runs[name] = runs.get(name, 0) + 1

    def retries(self, key: str) -> int:
        return sum(n - 1 for n in self.starts.get(key, {}).values())

    def forget(self, key: str) -> None:
        self.starts.pop(key, None)


def _tally(ray: Any) -> Any | None:
    """The tally actor of this connection (None if it cannot be made: counts are a nicety)."""
    try:
        tally = ray.remote(num_cpus=0)(_Tally).options(
            name="dtrak-retry-tally", get_if_exists=True, max_restarts=-1).remote()
        # wait until it runs (its process imports dtrak and torch: seconds, more on a busy
        # machine), so that a worker's first report is not the one that times out
        ray.get(tally.retries.remote(""), timeout=_TALLY_START_S)
        return tally
    except Exception as e:  # noqa: BLE001
        log.debug("no retry tally: %s", e)
        return None


def _run_in_worker(fn: Callable[[dict], Any], payload: dict, threads: int, cwd: str,
                   tally: Any, key: str, name: str) -> None:
    """What a Ray task runs: one job, in the submitter's directory, on its own CPUs."""
    if tally is not None:  # waited for: a worker killed right after must still be counted
        try:
            _import_ray().get(tally.started.remote(key, name), timeout=_TALLY_CALL_S)
        except Exception as e:  # noqa: BLE001 - the counts are a nicety
            log.debug("retry tally unavailable: %s", e)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    set_threads(threads)
    fn(payload)


def _as_job(job: Any) -> Any:
    return job.as_job() if hasattr(job, "as_job") else job  # a farm.TrainJob


class RayExecutor:
    """Runs jobs as Ray tasks (see the module's doc); ``retries`` and ``failures`` count the
    last :meth:`run`."""

    def __init__(self, address: str | None = None, workers: int = 1, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, max_retries: int = MAX_RETRIES,
                 progress: bool = True, poll_s: float = 1.0) -> None:
        self.address = address
        self.workers = workers
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.progress = progress
        self.poll_s = poll_s
        self.retries = 0
        self.failures = 0

    @classmethod
    def from_runtime(cls, runtime: RuntimeConfig, progress: bool = True) -> RayExecutor:
        """The executor of ``runtime.executor = "ray"`` (its factory in ``farm.EXECUTORS``)."""
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(INSTALL_HINT)
        if runtime.device.startswith("cuda") and runtime.num_gpus == 0:
            log.warning("runtime.device = %r but runtime.num_gpus = 0: Ray does not place "
                        "the jobs by GPU (set runtime.num_gpus, e.g. 1, or 0.5 for two jobs "
                        "per GPU)", runtime.device)
        return cls(runtime.ray_address, runtime.workers, runtime.num_cpus, runtime.num_gpus,
                   progress=progress)

    def run(self, jobs: Sequence[Any], desc: str = "jobs") -> None:
        jobs = [_as_job(j) for j in jobs]
        todo = [j for j in jobs if not j.done]
        self.retries = self.failures = 0
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc,
                   disable=not self.progress)
        try:
            if todo:
                self._run(todo, bar, desc)
        finally:
            bar.close()

    def _run(self, todo: list, bar: tqdm, desc: str) -> None:
        # a local Ray gets the CPUs of ``workers`` jobs at once
        ray = connect(self.address, max(1, math.ceil(self.workers * self.num_cpus)))
        self._check_fits(ray)
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                          max_retries=self.max_retries, retry_exceptions=False)(_run_in_worker)
        tally, key = _tally(ray), uuid.uuid4().hex
        threads, cwd = max(1, int(self.num_cpus)), os.getcwd()
        refs = {task.options(name=job.name).remote(job.fn, job.payload, threads, cwd, tally,
                                                   key, job.name): job
                for job in todo}
        failed = []
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    job = refs.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        log.error("%s failed on Ray: %s", job.name, e)
                        failed.append((job, e))
                    bar.update()
                self._count(ray, tally, key, failed, bar, final=not refs)
        except BaseException:
            for ref in refs:  # interrupted: stop what is still running (it resumes later)
                ray.cancel(ref, force=True)
            raise
        finally:
            if tally is not None:
                tally.forget.remote(key)
        if failed:
            self._raise(failed, len(todo), desc)

    def _check_fits(self, ray: Any) -> None:
        """A job that asks for more than the cluster has would wait for ever: say so."""
        have = ray.cluster_resources()
        for key, need in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
            if need > have.get(key, 0):
                msg = (f"runtime.num_{key.lower()}s: a job asks for {need:g} {key}s, the Ray "
                       f"cluster has {have.get(key, 0):g}")
                if _started_here:  # a local Ray does not grow
                    raise ConfigError(msg)
                log.warning("%s: the jobs wait until it grows", msg)

    def _count(self, ray: Any, tally: Any, key: str, failed: list, bar: tqdm,
               final: bool) -> None:
        self.failures = len(failed)
        if tally is not None and (final or not bar.disable):
            try:
                self.retries = ray.get(tally.retries.remote(key), timeout=_TALLY_CALL_S)
            except Exception as e:  # noqa: BLE001 - the counts are a nicety
                log.debug("retry tally unavailable: %s", e)
        if self.retries or self.failures:
            bar.set_postfix(retries=self.retries, failed=self.failures, refresh=False)

    @staticmethod
    def _raise(failed: list, n: int, desc: str) -> None:
        names = ", ".join(job.name for job, _ in failed[:5]) + (", ..." if len(failed) > 5
                                                                  else "")
        summary = f"{len(failed)} of {n} {desc} failed on Ray ({names})"
        err = failed[0][1]
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):  # the job's own exception, with its type
            cause.add_note(summary)
            raise cause from err
        raise RuntimeError(f"{summary}: {err}") from err
