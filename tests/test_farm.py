"""Executors: workers die with their parent, and a failing job reaches the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrak import farm
from dtrak.config import ConfigError, apply_overrides, preset
from dtrak.farm import Job, LocalExecutor
from dtrak.stages.check import check_config

TESTS = Path(__file__).resolve().parent


def sleeper(payload: dict) -> None:
    """A job that writes its pid, then a heartbeat every 0.1 s for five minutes."""
    out = Path(payload["dir"])
    tmp = out / f"{payload['name']}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.replace(out / f"{payload['name']}.pid")
    for i in range(3000):
        (out / f"{payload['name']}.beat").write_text(str(i))
        time.sleep(0.1)


def failing(payload: dict) -> None:
    raise ValueError(f"job {payload['name']} failed")


PARENT = """
import sys
sys.path.insert(0, {tests!r})
from dtrak import farm
from dtrak.farm import Job, LocalExecutor
from test_farm import sleeper

if __name__ == "__main__":
    jobs = [Job(f"j{{i}}", sleeper, {{"dir": {out!r}, "name": f"j{{i}}"}}) for i in range(2)]
    LocalExecutor(2, threads_per_worker=1, progress=False).run(jobs)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a dead process that nobody reaped yet is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return not Path("/proc").is_dir()


def _wait(cond, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


# Both tests start spawn workers that each import torch and diffusers: 20-60 s on 2 cores.
def test_workers_die_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=str(TESTS), out=str(tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)])
    pid_files = [tmp_path / f"j{i}.pid" for i in range(2)]
    pids = []
    try:
        started = _wait(lambda: all(p.exists() for p in pid_files) or parent.poll() is not None,
                        600)  # spawned workers import torch and diffusers: slow on a busy machine
        assert started and parent.poll() is None, "the workers did not start"
        pids = [int(p.read_text()) for p in pid_files]
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait(lambda: not any(_alive(p) for p in pids), 5), "workers outlived the parent"
        beats = [(tmp_path / f"j{i}.beat").read_text() for i in range(2)]
        time.sleep(0.5)
        assert beats == [(tmp_path / f"j{i}.beat").read_text() for i in range(2)]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_failing_job_raises_its_error_in_the_parent(tmp_path):
    jobs = [Job(f"j{i}", failing, {"name": f"j{i}"}) for i in range(2)]
    with pytest.raises(ValueError, match=r"job j\d failed"):
        LocalExecutor(2, threads_per_worker=1, progress=False).run(jobs)


def test_an_unknown_executor_is_refused_before_any_stage_runs():
    cfg = apply_overrides(preset("tiny"), ["runtime.executor='slurm'"])
    with pytest.raises(ConfigError, match="unknown executor 'slurm'; known: local, ray"):
        check_config(cfg)


def test_local_workers_never_oversubscribe_the_cores(monkeypatch, caplog):
    """runtime.threads is the main process's: worker processes get at most their share."""
    monkeypatch.setattr(farm.mp, "cpu_count", lambda: 4)
    assert LocalExecutor(2, progress=False).threads == 2
    assert LocalExecutor(2, threads_per_worker=1, progress=False).threads == 1
    with caplog.at_level("WARNING", logger="dtrak.farm"):
        assert LocalExecutor(2, threads_per_worker=4, progress=False).threads == 2
    assert "oversubscribe" in caplog.text
    assert LocalExecutor(1, threads_per_worker=4, progress=False).threads == 4
