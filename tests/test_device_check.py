"""The prepared GPU check runs here, at tiny sizes on the CPU, so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--device", "cpu", "--tiny",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["environment"]["device"] == "cpu" and res["sizes"] == "tiny"
    # the CUDA-marked tests were collected and skipped here (no GPU), none failed
    assert res["cuda_tests"]["ok"] and res["cuda_tests"]["counts"].get("skipped", 0) >= 5
    assert res["train"][0]["steps_per_s"] > 0
    for row in res["featurize"]:
        assert row["grad_examples_per_s"] > 0 and 0 < row["ratio_to_batched_fwd_bwd"]
        assert row["projectors"]["sjlt"]["examples_per_s"] > 0
        assert row["projectors"]["srht"]["examples_per_s"] > 0
        assert "trak" in row["projectors"]["trak-cuda"]["skipped"]
    kernel = res["kernel"]
    assert kernel["max_rel_eig_diff"] < 1e-8 and kernel["sweep_finite"]
    assert res["projected"]["hours"] > 0 and res["projected"]["examples"] == 7000
    table = (tmp_path / "device_check.md").read_text()
    assert "| kernel |" in table and "| projected |" in table


def test_device_check_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--gpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --gpu" in proc.stderr
