"""Train the first N LDS subset models of a finished run again through Ray (2 workers) in a
scratch directory and compare them, tensor by tensor, with the ones the local executor made.

    python benchmarks/ray_vs_local.py RUN SCRATCH N     # e.g. bench-runs/cifar2 /tmp/c2ray 4
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from dtrak.config import RuntimeConfig
from dtrak.farm import TrainJob, make_executor, train_jobs

run, copy, n = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), int(sys.argv[3])
copy.mkdir(parents=True, exist_ok=True)
(copy / "data").exists() or os.symlink(run / "data", copy / "data")
jobs = [TrainJob.from_dict(d) for d in json.loads((run / "lds" / "jobs.json").read_text())[:n]]
os.chdir(copy)  # job paths are relative to the run directory
runtime = RuntimeConfig(executor="ray", workers=2, device="cpu")
t0 = time.time()
make_executor(runtime, progress=True).run(train_jobs(jobs, runtime), desc="ray LDS models")
print(f"{n} models through Ray in {time.time() - t0:.0f} s")
name = "diffusion_pytorch_model.safetensors"
for j in jobs:
    a = load_file(str(run / j.directory / "unet" / name))
    b = load_file(str(copy / j.directory / "unet" / name))
    same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    print(j.name, "bit-identical" if same else "DIFFERENT", len(a), "tensors")
