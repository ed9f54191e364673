#!/usr/bin/env python
"""Fault injection: does dtrak ever silently use bad input or a damaged artefact?

    .venv/bin/python benchmarks/faults.py [--work DIR] [--only CATEGORY] [--case TEXT]

Builds one tiny finished run (``WORK/base``: configs/tiny.toml cut down to 10 training
steps, 6 generated images, 6 targets, 3 LDS subsets, methods trak / dtrak / datamodel),
then runs a catalogue of cases. Each case copies the base run (or starts a fresh one),
applies one fault, runs the ``dtrak`` command(s) a user would run next as subprocesses, and
classifies what happened:

    clear-error  exit != 0, no Python traceback, and stderr ends with the error: exactly one
                 line starting with ``error:`` (click's own usage errors: ``Error:``), followed
                 by nothing but its indented continuation lines
    traceback    exit != 0 with a Python traceback (a defect)
    recovered    exit 0 and the result equals what a clean run gives (for faults the tool is
                 meant to repair or recompute: a deleted artefact, a kill then a rerun)
    silent       exit 0 but the result differs from the clean one, or bad input / a damaged
                 file was accepted (the worst defect)
    unclear-error, timeout
                 exit != 0 without one clean ``error:`` line, or no exit within the limit
                 (defects too; counted as "other")

It prints a Markdown table (category, case, expected, got, seconds), one summary line per
category, the commands and stderr of every case that is a defect or differs from its
expected class, and exits 1 if there is any such case.

Categories: config (config files, --set overrides, command-line options), data (data
roots, image folders, CIFAR-10 batches), damaged (artefacts of a finished run truncated,
garbled or deleted, then the stage that reads them), stale (--overwrite with a changed key
must equal a fresh run with that key), kill (SIGKILL in the middle of a stage, rerun,
bit-for-bit equal to the clean run; no worker outlives its killed parent), rundir (moved
runs, failed first commands, read-only commands leave the run untouched), fs (file system).

Not simulated, because it needs rights this benchmark does not assume: a read-only run
directory (root ignores permission bits, and ``chattr +i`` / a read-only bind mount need
capabilities) and a full disk (a tiny tmpfs needs mount rights). A full disk is
approximated by RLIMIT_FSIZE (writes past the limit fail with EFBIG, as they would with
ENOSPC; Python ignores SIGXFSZ), see the ``fs`` cases.

The default set (about 80 cases; ``--all`` adds about 60 more variants) took 43 minutes
with ``--jobs 2`` on 2 cores shared with other jobs (load 5-8): most of it is the import of
torch and diffusers in every ``dtrak`` subprocess (10 s on an idle core, 30 s under that
load); on an idle machine expect about a third of that. ``--jobs 2`` runs independent cases
two at a time; the kill cases always run alone, after the others (their timing matters).
``--case TEXT`` (repeatable) reruns single cases; ``--reuse-base`` skips rebuilding the
base run (only while src/ is unchanged).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
DTRAK = Path(sys.executable).parent / "dtrak"
if not DTRAK.exists():  # not run with the venv's python: take the one on PATH
    DTRAK = Path(shutil.which("dtrak") or "dtrak")

#: The base run: configs/tiny.toml, cut down to seconds.
BASE_SETS = (
    "train.steps=10",
    "sampling.n_images=6",
    "attribution.n_targets=6",
    "lds.n_subsets=3",
    'attribution.methods=["trak","dtrak","datamodel"]',
    'stages=["data","train","generate","featurize","score","lds","report"]',
    "runtime.threads=1",
)

CLASSES = ("clear-error", "recovered", "traceback", "silent")
DEFECTS = ("traceback", "silent", "unclear-error", "timeout")
CATEGORIES = ("config", "data", "damaged", "stale", "kill", "rundir", "fs")
CMD_TIMEOUT = 600


# ============================================================================ processes


@dataclass
class Proc:
    argv: list[str]
    rc: int | None  # None: timed out; negative: killed by that signal
    out: str
    err: str
    seconds: float

    @property
    def command(self) -> str:
        return " ".join(shlex.quote(str(a)) for a in self.argv)


def _env() -> dict:
    # one thread per process: the machine is small and shared; the base run and every case
    # see the same environment, so results stay comparable bit for bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}


def run_argv(argv: list, timeout: float = CMD_TIMEOUT, fsize: int | None = None) -> Proc:
    argv = [str(a) for a in argv]
    pre = None
    if fsize is not None:
        import resource

        def pre() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    t0 = time.time()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(),
                           cwd=REPO, preexec_fn=pre)
        return Proc(argv, p.returncode, p.stdout, p.stderr, time.time() - t0)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return Proc(argv, None, text(e.stdout), text(e.stderr), time.time() - t0)


def dtrak(*args, **kw) -> Proc:
    return run_argv([DTRAK, *args], **kw)


def sets(items: Iterable[str]) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


# ============================================================================ classification


_ERROR_LINE = re.compile(r"^(error|Error):")


def error_class(p: Proc) -> str:
    """The class of a failed command (rc != 0)."""
    if p.rc is None:
        return "timeout"
    if "Traceback (most recent call last)" in p.err:
        return "traceback"
    lines = [ln for ln in p.err.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if _ERROR_LINE.match(ln)]
    if len(starts) == 1 and all(ln[:1].isspace() for ln in lines[starts[0] + 1:]):
        return "clear-error"
    return "unclear-error"


Check = Callable[[], "tuple[bool, str]"]


@dataclass
class Outcome:
    got: str
    procs: list[Proc] = field(default_factory=list)
    note: str = ""


def judge(p: Proc, check: Check | None = None, procs: list[Proc] | None = None,
          note: str = "") -> Outcome:
    """Classify the final command of a case; ``check`` says whether an exit-0 result equals
    the clean one (without it, exit 0 means the fault was accepted: silent)."""
    procs = [*(procs or []), p]
    if p.rc != 0:
        return Outcome(error_class(p), procs, note)
    if check is None:
        return Outcome("silent", procs, note or "exit 0: the fault was accepted")
    try:
        ok, why = check()
    except Exception as e:  # a missing result file, say
        ok, why = False, f"check failed: {type(e).__name__}: {e}"
    return Outcome("recovered" if ok else "silent", procs, "; ".join(x for x in (note, why) if x))


def expect_error_first(p: Proc, procs: list[Proc]) -> Outcome | None:
    """For two-step cases: the first command must fail cleanly, else that is the outcome."""
    procs.append(p)
    if p.rc == 0:
        return Outcome("silent", procs, "the first (faulty) command exited 0")
    cls = error_class(p)
    return None if cls == "clear-error" else Outcome(cls, procs, "the first command")


# ============================================================================ comparisons


def _lds_numbers(run: Path) -> dict:
    d = json.loads((run / "results" / "lds.json").read_text())
    return {k: d.get(k) for k in ("records", "lds_by_lambda", "ceiling")}


def same_lds(a: Path, b: Path) -> tuple[bool, str]:
    """results/lds.json of two runs: every record, lambda curve and ceiling, exactly."""
    x, y = _lds_numbers(a), _lds_numbers(b)
    if x == y:
        return True, f"lds.json equal ({len(x['records'])} records)"
    diff = [f"{r['method']}/{r['targets']}/{r.get('lambda_selection')}: "
            f"{r['lds']} vs {s['lds']}"
            for r, s in zip(x["records"], y["records"], strict=False) if r != s]
    return False, "lds.json differs: " + "; ".join(diff[:6] or ["record lists differ"])


def _npys(run: Path, sub: str) -> dict[str, Path]:
    root = run / sub
    # hidden names are temporaries (a writer's private file or folder), not artefacts
    return {str(p.relative_to(run)): p for p in sorted(root.rglob("*.npy"))
            if not any(part.startswith(".") for part in p.relative_to(run).parts)
            } if root.exists() else {}


def same_npys(a: Path, b: Path, sub: str, rtol: float = 0.0) -> tuple[bool, str]:
    """Every .npy under ``sub`` of run ``a`` equals run ``b``'s: bit for bit, or with
    ``rtol`` to within rtol x the largest magnitude of the array (float rounding of a
    different batch composition, for rows recomputed apart from their original batch)."""
    fa, fb = _npys(a, sub), _npys(b, sub)
    if set(fa) != set(fb):
        return False, f"{sub}: files differ: {sorted(set(fa) ^ set(fb))[:4]}"
    bad, worst = [], 0.0
    for k in fa:
        x, y = np.load(fa[k]), np.load(fb[k])
        if np.array_equal(x, y, equal_nan=True):
            continue
        if rtol and x.shape == y.shape and x.size:
            scale = float(np.abs(y).max()) or 1.0
            err = float(np.abs(x.astype(np.float64) - y).max()) / scale
            worst = max(worst, err)
            if err <= rtol:
                continue
        bad.append(k)
    if bad:
        return False, f"{sub}: arrays differ: {bad[:4]}" + (f" (rel. diff {worst:.1e})"
                                                             if worst else "")
    if worst:
        return True, f"{sub}: {len(fa)} arrays equal to float rounding (rel. diff {worst:.1e})"
    return True, f"{sub}: {len(fa)} arrays equal"


def same_model(a: Path, b: Path) -> tuple[bool, str]:
    """Two diffusers model folders hold the same tensors."""
    from safetensors.numpy import load_file

    name = "diffusion_pytorch_model.safetensors"
    x, y = load_file(str(a / name)), load_file(str(b / name))
    if x.keys() != y.keys() or any(not np.array_equal(x[k], y[k]) for k in x):
        return False, f"{a} differs from {b}"
    return True, f"{a.parent.name}/{a.name}: {len(x)} tensors equal"


def all_of(*checks: Check) -> Check:
    def check() -> tuple[bool, str]:
        notes = []
        for c in checks:
            ok, why = c()
            notes.append(why)
            if not ok:
                return False, why
        return True, "; ".join(notes)
    return check


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def untouched(run: Path, before: dict) -> Check:
    def check() -> tuple[bool, str]:
        after = snapshot(run)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            return False, f"files of the run changed: {changed[:6]}"
        return True, f"all {len(after)} files of the run untouched"
    return check


def mtimes(run: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.glob(pattern))}


def mtimes_kept(run: Path, before: dict[str, int], pattern: str) -> Check:
    def check() -> tuple[bool, str]:
        after = mtimes(run, pattern)
        if not before:
            return False, f"no files match {pattern}"
        if after != before:
            return False, f"{pattern}: rewritten (retrained?)"
        return True, f"{len(after)} x {pattern} not rewritten"
    return check


# ============================================================================ damage


def one(run: Path, pattern: str) -> Path:
    found = sorted(run.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} in {run}")
    return found[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def garble_head(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[:n] = bytes((i * 37 + 11) % 256 for i in range(min(n, len(data))))
    path.write_bytes(bytes(data))


def bad_json(path: Path) -> None:
    path.write_text('{"this is": not json')


def delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ============================================================================ the catalogue


@dataclass
class Case:
    category: str
    name: str
    expected: str  # a class, or "a|b" where either is right
    fn: Callable[[Ctx], Outcome]
    serial: bool = False

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.category}-{self.name}".lower()).strip("-")[:80]


class Ctx:
    def __init__(self, work: Path, case: Case) -> None:
        self.work, self.case = work, case
        self.base = work / "base"

    def copy_base(self, suffix: str = "") -> Path:
        dst = self.work / "cases" / (self.case.slug + suffix)
        delete(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.base, dst, symlinks=True)
        return dst

    def fresh(self, suffix: str = "") -> Path:
        dst = self.work / "cases" / (self.case.slug + suffix)
        delete(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst

    def inputs(self, suffix: str = "") -> Path:
        d = self.work / "inputs" / (self.case.slug + suffix)
        delete(d)
        d.mkdir(parents=True)
        return d


CASES: list[Case] = []

#: Cases run only with --all (the default set keeps one or two of each kind of fault).
EXTENDED = frozenset({
    # config
    "unknown section", "fraction for an int (train.steps=1.5)", "list for a float (train.lr=[1,2])",
    "train.lr=-0.001", "train.mixed_precision=fp8", "model.beta_start > beta_end",
    "sampling.sampler=euler", "attribution.n_timesteps=0", "method@0",
    "ensemble larger than the pool", "lds.seeds=[]", "counterfactual.remove=8.5",
    "unknown counterfactual method", "runtime.workers=0", "bad --set key (a.b.c=1)",
    "TOML preset = nosuch", "TOML section that is not a table", "TOML unknown key",
    "--config is a directory", "model.family=vit (train)", "model.preset=huge (train)",
    "TracIn checkpoint that does not exist (score)",
    "unknown method on the command line (score --method)",
    "unknown output on the command line (featurize --output)",
    "unknown target set (featurize --targets)", "--shard 3/2", "--shards -1",
    "compare an unknown method", "attribution.n_targets=0 (score)",
    # data
    "data root is a file", "zero-byte PNG", "class that has no folder", "a class listed twice",
    "unknown data set name", "CIFAR-10 batch of the wrong shape",
    "CIFAR-10 archive that is not a gzip",
    # damaged
    "truncated features.npy -> lds", "garbled header of features.npy -> featurize",
    "feature meta.json deleted -> featurize", "truncated gen/images.npy -> generate",
    "truncated gen/trajectory.npy -> score", "gen/trajectory.npy deleted -> generate", "gen/meta.json invalid JSON -> score",
    "lds/truth/gen.json invalid JSON -> lds", "truncated lds/masks.npy -> lds",
    "truncated scores/trak/val.npy -> score", "scores/trak/val.json invalid JSON -> score",
    "scores and results deleted -> score (prior lambda)",
    "truncated pool/truth/val.npy, datamodel scores deleted -> score",
    "pool/masks.npy replaced by other masks -> score",
    "model config.json invalid JSON (features deleted) -> featurize",
    "model/done.json invalid JSON -> train",
    "checkpoint state.json invalid JSON, unfinished model -> train",
    "run config.json deleted -> lds", "data/splits.json of another split -> score",
    "truncated data/train_images.npy, a subset model deleted -> lds",
    # stale, kill
    "--overwrite train.lr=0.001 == fresh run",
    "SIGKILL in featurize --shards 2 (no orphan workers), rerun",
    # rundir, fs
    "failed first command (bad value), corrected retry", "report of a directory that is no run",
    "--out is a regular file (run)", "report RUN where RUN is a regular file",
    "file-size limit (disk full) in lds, then rerun",
})


def case(category: str, name: str, expected: str, serial: bool = False):
    def deco(fn: Callable[[Ctx], Outcome]) -> Callable[[Ctx], Outcome]:
        CASES.append(Case(category, name, expected, fn, serial))
        return fn
    return deco


# ---------------------------------------------------------------------------- 1. config

# Values the config or its cross-section checks must refuse when a run is opened, before
# anything is computed: `dtrak data --config configs/tiny.toml --out NEW --set KEY=VALUE`
# (exit 0 = the bad value was accepted and saved into the run).
_OPEN_REFUSED = [
    ("unknown key train.stepz", ["train.stepz=5"]),
    ("unknown section", ["traning.steps=5"]),
    ("text for an int (train.steps=ten)", ["train.steps=ten"]),
    ("fraction for an int (train.steps=1.5)", ["train.steps=1.5"]),
    ("list for a float (train.lr=[1,2])", ["train.lr=[1,2]"]),
    ("train.batch_size=0", ["train.batch_size=0"]),
    ("train.lr=-0.001", ["train.lr=-0.001"]),
    ("train.mixed_precision=fp8", ["train.mixed_precision=fp8"]),
    ("data.train_size=1", ["data.train_size=1"]),
    ("model.dropout=1.5", ["model.dropout=1.5"]),
    ("model.beta_start > beta_end", ["model.beta_start=0.5", "model.beta_end=0.1"]),
    ("sampling.n_images=-3", ["sampling.n_images=-3"]),
    ("sampling.sampler=euler", ["sampling.sampler=euler"]),
    ("attribution.n_timesteps=0", ["attribution.n_timesteps=0"]),
    ("unknown method name", ['attribution.methods=["trak","trakk"]']),
    ("method@0", ['attribution.methods=["trak@0"]']),
    ("unknown output", ['attribution.outputs=["loss","sqaure"]']),
    ("ensemble larger than the pool", ['attribution.methods=["trak-ensemble"]']),
    ("lds.n_subsets=2", ["lds.n_subsets=2"]),
    ("lds.alpha=1.5", ["lds.alpha=1.5"]),
    ("lds.seeds=[]", ["lds.seeds=[]"]),
    ("counterfactual.remove >= train size (64 of 64)", ["counterfactual.remove=64"]),
    ("counterfactual.remove=8.5", ["counterfactual.remove=8.5"]),
    ("unknown counterfactual method", ['counterfactual.methods=["random","dtrakk"]']),
    ("runtime.device=tpu", ["runtime.device=tpu"]),
    ("runtime.dtype=float16", ["runtime.dtype=float16"]),
    ("runtime.workers=0", ["runtime.workers=0"]),
    ("bad --set syntax (no =)", ["train.steps"]),
    ("bad --set key (a.b.c=1)", ["train.steps.max=1"]),
]


def _open_refused(name: str, items: list[str]) -> None:
    @case("config", name, "clear-error")
    def fn(ctx: Ctx) -> Outcome:
        out = ctx.fresh()
        return judge(dtrak("data", "--config", TINY, "--out", out, "-q", *sets(items)))


for _name, _items in _OPEN_REFUSED:
    _open_refused(_name, _items)


@case("config", "unknown preset (--config nosuch)", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("data", "--config", "nosuch", "--out", ctx.fresh(), "-q"))


def _toml_case(name: str, text: str) -> None:
    @case("config", name, "clear-error")
    def fn(ctx: Ctx) -> Outcome:
        cfg = ctx.inputs() / "bad.toml"
        cfg.write_text(text)
        return judge(dtrak("data", "--config", cfg, "--out", ctx.fresh(), "-q"))


_toml_case("unparseable TOML", 'preset = "tiny"\n[train\nsteps = 10\n')
_toml_case("TOML preset = nosuch", 'preset = "nosuch"\n')
_toml_case("TOML section that is not a table", 'preset = "tiny"\ntrain = 5\n')
_toml_case("TOML unknown key", 'preset = "tiny"\n[lds]\nn_subset = 4\n')


@case("config", "unknown stage in --stages", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("run", TINY, "--out", ctx.fresh(), "-q", "--stages", "data,trian"))


@case("config", "--config is a directory", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("data", "--config", ctx.inputs(), "--out", ctx.fresh(), "-q"))


# Values that only the stage consuming them can judge: a copy of the base run, the stage
# with --overwrite (or the key is result-neutral): exit 0 = the bad value was used.
def _stage_refused(name: str, argv: list[str], overwrite: bool = True) -> None:
    @case("config", name, "clear-error")
    def fn(ctx: Ctx) -> Outcome:
        run = ctx.copy_base()
        args = [a.replace("{run}", str(run)) for a in argv]
        return judge(dtrak(*args, *(["--overwrite"] if overwrite else [])))


_stage_refused("attribution.projector=bogus (featurize)",
               ["featurize", "--out", "{run}", "-q", "--set", "attribution.projector=bogus"])
_stage_refused("model.family=vit (train)",
               ["train", "--out", "{run}", "-q", "--set", "model.family=vit"])
_stage_refused("model.preset=huge (train)",
               ["train", "--out", "{run}", "-q", "--set", "model.preset=huge"])
_stage_refused("attribution.targets=[test] (score)",
               ["score", "--out", "{run}", "-q", "--set", 'attribution.targets=["test"]'],
               overwrite=False)
_stage_refused("TracIn checkpoint that does not exist (score)",
               ["score", "--out", "{run}", "-q", "--method", "tracin-cos",
                "--set", "attribution.checkpoints=[999]"])
_stage_refused("unknown method on the command line (score --method)",
               ["score", "--out", "{run}", "-q", "--method", "nosuch"], overwrite=False)
_stage_refused("unknown output on the command line (featurize --output)",
               ["featurize", "--out", "{run}", "-q", "--output", "sqaure"], overwrite=False)
_stage_refused("unknown target set (featurize --targets)",
               ["featurize", "--out", "{run}", "-q", "--targets", "train,test"],
               overwrite=False)
_stage_refused("--shard 3/2", ["featurize", "--out", "{run}", "-q", "--shard", "3/2"],
               overwrite=False)
_stage_refused("--shards -1",
               ["featurize", "--out", "{run}", "-q", "--shards", "-1"], overwrite=False)
_stage_refused("compare an unknown method",
               ["compare", "trak", "nosuch", "--out", "{run}"], overwrite=False)
_stage_refused("lds.noise_seeds=[] (lds)",
               ["lds", "--out", "{run}", "-q", "--set", "lds.noise_seeds=[]"])
_stage_refused("lds.n_boot=0 (lds)", ["lds", "--out", "{run}", "-q", "--set", "lds.n_boot=0"])
_stage_refused("attribution.n_targets=0 (score)",
               ["score", "--out", "{run}", "-q", "--set", "attribution.n_targets=0"])
_stage_refused("attribution.n_targets=-1 (score)",
               ["score", "--out", "{run}", "-q", "--set", "attribution.n_targets=-1"])
_stage_refused("runtime.executor=slurm (lds)",
               ["lds", "--out", "{run}", "-q", "--set", "runtime.executor=slurm"],
               overwrite=False)
_stage_refused("unknown stage in the config's stages (run)",
               ["run", str(TINY), "--out", "{run}", "-q", *sets(BASE_SETS),
                "--set", 'stages=["data","trian"]'], overwrite=False)
_stage_refused("runtime.device=cuda without a GPU (generate)",
               ["generate", "--out", "{run}", "-q", "--set", "runtime.device=cuda:7"],
               overwrite=False)


# ---------------------------------------------------------------------------- 2. data


def _png(path: Path, seed: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def image_folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("a", "b")) -> Path:
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _png(root / c / f"{i:03d}.png", 100 * ci + i)
    return root


# 12 images, train 8 + val 4: every file is loaded
FOLDER_SETS = ("data.name=imagefolder", "data.train_size=8", "data.val_size=4",
               "counterfactual.remove=2")


def _folder_case(name: str, make: Callable[[Path], Path], extra: tuple[str, ...] = (),
                 expected: str = "clear-error") -> None:
    @case("data", name, expected)
    def fn(ctx: Ctx) -> Outcome:
        root = make(ctx.inputs())
        return judge(dtrak("data", "--config", TINY, "--out", ctx.fresh(), "-q",
                           *sets([*FOLDER_SETS, f'data.root="{root}"', *extra])))


_folder_case("missing data root", lambda d: d / "does-not-exist")
_folder_case("data root is a file", lambda d: (d / "f.png").write_bytes(b"x") and d / "f.png")
_folder_case("empty image folder", lambda d: d)


def _non_images(d: Path) -> Path:
    for c in ("a", "b"):
        (d / c).mkdir()
        (d / c / "notes.txt").write_text("not an image")
        (d / c / "data.csv").write_text("1,2,3")
    return d


_folder_case("only non-image files", _non_images)


def _text_as_png(d: Path) -> Path:
    image_folder(d)
    (d / "b" / "003.png").write_text("this is not a PNG")
    return d


def _truncated_png(d: Path) -> Path:
    image_folder(d)
    truncate(d / "a" / "002.png", 0.4)
    return d


def _empty_png(d: Path) -> Path:
    image_folder(d)
    (d / "b" / "005.png").write_bytes(b"")
    return d


_folder_case("text file named .png", _text_as_png)
_folder_case("truncated PNG", _truncated_png)
_folder_case("zero-byte PNG", _empty_png)
_folder_case("train_size larger than the folder", image_folder, ("data.train_size=100",))
_folder_case("class that has no folder", image_folder, ('data.classes=["a","zebra"]',))


def _data_set_case(name: str, override: str) -> None:
    """A data-stage case: one ``--set`` on the tiny config, expected to be refused."""

    @case("data", name, "clear-error")
    def _(ctx: Ctx) -> Outcome:
        return judge(dtrak("data", "--config", TINY, "--out", ctx.fresh(), "-q",
                           "--set", override))


for _name, _override in (
    ("wrong class names (digits: cat, dog)", 'data.classes=["cat","dog"]'),
    ("a class listed twice", 'data.classes=["1","2","1"]'),
    ("train_size larger than the data (digits 5000)", "data.train_size=5000"),
    ("unknown data set name", "data.name=mnist"),
):
    _data_set_case(_name, _override)


class _Marker:
    """Unpickling this runs ``touch MARKER`` (what a crafted batch file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _cifar_batch(seed: int, n: int = 20) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(i % 10) for i in range(n)], b"batch_label": b"fake"}


def cifar_batches(d: Path) -> Path:
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        (d / name).write_bytes(pickle.dumps(_cifar_batch(i)))
    return d


CIFAR_SETS = ("data.name=cifar2", "data.train_size=8", "data.val_size=4",
              "counterfactual.remove=2")


def _refused_pickle(ctx: Ctx, root: Path, marker: Path) -> Outcome:
    """Run the data stage on a crafted CIFAR-10 root: silent if the pickle ran code."""
    out = judge(dtrak("data", "--config", TINY, "--out", ctx.fresh(), "-q",
                      *sets([*CIFAR_SETS, f'data.root="{root}"'])))
    if marker.exists():
        return Outcome("silent", out.procs, f"the pickle ran code: {marker} exists")
    out.note = "marker file not created"
    return out


@case("data", "crafted pickle in a CIFAR-10 root", "clear-error")
def _(ctx: Ctx) -> Outcome:
    d = cifar_batches(ctx.inputs())
    marker = ctx.work / "inputs" / f"{ctx.case.slug}-MARKER"
    delete(marker)
    payload = {b"data": _Marker(marker), b"labels": [0, 1], b"batch_label": b"x"}
    (d / "data_batch_1").write_bytes(pickle.dumps(payload))
    return _refused_pickle(ctx, d, marker)


@case("data", "crafted pickle in a CIFAR-10 archive", "clear-error")
def _(ctx: Ctx) -> Outcome:
    d = ctx.inputs()
    marker = ctx.work / "inputs" / f"{ctx.case.slug}-MARKER"
    delete(marker)
    with tarfile.open(d / "cifar-10-python.tar.gz", "w:gz") as tar:
        for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
            obj = _cifar_batch(i)
            if name == "test_batch":
                obj[b"labels"] = _Marker(marker)
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _refused_pickle(ctx, d / "cifar-10-python.tar.gz", marker)


@case("data", "truncated CIFAR-10 batch", "clear-error")
def _(ctx: Ctx) -> Outcome:
    d = cifar_batches(ctx.inputs())
    truncate(d / "data_batch_3", 0.5)
    return judge(dtrak("data", "--config", TINY, "--out", ctx.fresh(), "-q",
                       *sets([*CIFAR_SETS, f'data.root="{d}"'])))


@case("data", "CIFAR-10 batch of the wrong shape", "clear-error")
def _(ctx: Ctx) -> Outcome:
    d = cifar_batches(ctx.inputs())
    bad = _cifar_batch(9)
    bad[b"data"] = bad[b"data"][:, :1000]
    (d / "data_batch_2").write_bytes(pickle.dumps(bad))
    return judge(dtrak("data", "--config", TINY, "--out", ctx.fresh(), "-q",
                       *sets([*CIFAR_SETS, f'data.root="{d}"'])))


@case("data", "CIFAR-10 archive that is not a gzip", "clear-error")
def _(ctx: Ctx) -> Outcome:
    arc = ctx.inputs() / "cifar-10-python.tar.gz"
    arc.write_bytes(b"<html>404 not found</html>" * 20)
    return judge(dtrak("data", "--config", TINY, "--out", ctx.fresh(), "-q",
                       *sets([*CIFAR_SETS, f'data.root="{arc}"'])))


def _replaced_case(name: str, first: tuple[str, ...]) -> None:
    @case("data", name, "clear-error")
    def fn(ctx: Ctx) -> Outcome:
        root = image_folder(ctx.inputs())
        run = ctx.fresh()
        items = [*FOLDER_SETS, f'data.root="{root}"', "train.steps=2", "runtime.threads=1",
                 "sampling.n_images=2", 'attribution.targets=["val"]']
        procs = []
        for stage in first:  # the README's ways in: `dtrak data` first, or `dtrak train`
            procs.append(dtrak(stage, "--config", TINY, "--out", run, "-q", *sets(items)))
            if procs[-1].rc != 0:
                return Outcome(error_class(procs[-1]), procs, f"setup ({stage}) failed")
        # same file names, other pixels: the model was trained on the old ones
        for i, f in enumerate(sorted(root.glob("*/*.png"))):
            _png(f, 999 + i)
        return judge(dtrak("featurize", "--out", run, "-q"), procs=procs)


_replaced_case("training images replaced on disk after data + train", ("data", "train"))
_replaced_case("training images replaced on disk after train (no data stage)", ("train",))


# ---------------------------------------------------------------------------- 3. damaged

FEAT_TRAIN = "features/full/train/loss-*"
FEAT_VAL = "features/full/val/square-*"


def _damage(name: str, damage: Callable[[Path], None], argv: list[str], expected: str,
            check: Callable[[Path, Path], tuple[bool, str]] | None = None) -> None:
    @case("damaged", name, expected)
    def fn(ctx: Ctx) -> Outcome:
        run = ctx.copy_base()
        damage(run)
        p = dtrak(*[a.replace("{run}", str(run)) for a in argv])
        return judge(p, (lambda: check(run, ctx.base)) if check else None)


def _feats_equal(run: Path, base: Path) -> tuple[bool, str]:
    return same_npys(run, base, "features")


def _feats_close(run: Path, base: Path) -> tuple[bool, str]:
    # rows recomputed in other batches (or one output alone instead of all outputs of a K
    # in one pass) agree with the clean run to float32 rounding, not bit for bit
    return same_npys(run, base, "features", rtol=1e-5)


def _gen_equal(run: Path, base: Path) -> tuple[bool, str]:
    return same_npys(run, base, "gen")


def _lds_equal(run: Path, base: Path) -> tuple[bool, str]:
    return all_of(lambda: same_lds(run, base), lambda: same_npys(run, base, "lds"))()


def _scores_equal(run: Path, base: Path) -> tuple[bool, str]:
    return same_npys(run, base, "scores")


def _model_equal(run: Path, base: Path) -> tuple[bool, str]:
    return same_model(run / "model" / "unet", base / "model" / "unet")


_damage("truncated features.npy -> featurize",
        lambda r: truncate(one(r, FEAT_TRAIN) / "features.npy"),
        ["featurize", "--out", "{run}", "-q"], "clear-error|recovered", _feats_equal)
_damage("truncated features.npy -> lds",
        lambda r: truncate(one(r, FEAT_VAL) / "features.npy"),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)
_damage("garbled header of features.npy -> featurize",
        lambda r: garble_head(one(r, FEAT_TRAIN) / "features.npy"),
        ["featurize", "--out", "{run}", "-q"], "clear-error|recovered", _feats_equal)
_damage("truncated done.npy of a feature store -> featurize",
        lambda r: truncate(one(r, FEAT_TRAIN) / "done.npy"),
        ["featurize", "--out", "{run}", "-q"], "clear-error|recovered", _feats_equal)


def _undone(r: Path) -> None:
    p = one(r, FEAT_TRAIN) / "done.npy"
    done = np.load(p)
    done[::3] = 0
    np.save(p, done)


_damage("done mask of a feature store reset -> featurize",
        _undone, ["featurize", "--out", "{run}", "-q"], "recovered", _feats_equal)
_damage("feature meta.json invalid JSON -> featurize",
        lambda r: bad_json(one(r, FEAT_TRAIN) / "meta.json"),
        ["featurize", "--out", "{run}", "-q"], "clear-error|recovered", _feats_equal)
_damage("feature meta.json deleted -> featurize",
        lambda r: delete(one(r, FEAT_TRAIN) / "meta.json"),
        ["featurize", "--out", "{run}", "-q"], "clear-error|recovered", _feats_equal)
_damage("feature store deleted -> featurize",
        lambda r: delete(one(r, FEAT_TRAIN)),
        ["featurize", "--out", "{run}", "-q"], "recovered", _feats_equal)
_damage("truncated gen/images.npy -> lds",
        lambda r: truncate(r / "gen" / "images.npy"),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)
_damage("truncated gen/images.npy -> generate",
        lambda r: truncate(r / "gen" / "images.npy"),
        ["generate", "--out", "{run}", "-q"], "clear-error|recovered", _gen_equal)
_damage("gen/images.npy deleted -> generate",
        lambda r: delete(r / "gen" / "images.npy"),
        ["generate", "--out", "{run}", "-q"], "recovered|clear-error", _gen_equal)
_damage("gen/trajectory.npy deleted -> generate",
        lambda r: delete(r / "gen" / "trajectory.npy"),
        ["generate", "--out", "{run}", "-q"], "recovered|clear-error", _gen_equal)
_damage("gen/done.npy deleted -> generate",
        lambda r: delete(r / "gen" / "done.npy"),
        ["generate", "--out", "{run}", "-q"], "recovered", _gen_equal)
_damage("truncated gen/trajectory.npy -> score",
        lambda r: (truncate(r / "gen" / "trajectory.npy"), delete(r / "scores")),
        ["score", "--out", "{run}", "-q"], "clear-error|recovered", _scores_equal)
_damage("gen/meta.json invalid JSON -> score",
        lambda r: (bad_json(r / "gen" / "meta.json"), delete(r / "scores")),
        ["score", "--out", "{run}", "-q"], "clear-error|recovered", _scores_equal)
_damage("truncated lds/truth/val.npy -> lds",
        lambda r: truncate(r / "lds" / "truth" / "val.npy"),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)
_damage("lds/truth/val.npy deleted -> lds",
        lambda r: delete(r / "lds" / "truth" / "val.npy"),
        ["lds", "--out", "{run}", "-q"], "recovered", _lds_equal)
_damage("lds/truth/gen.json invalid JSON -> lds",
        lambda r: bad_json(r / "lds" / "truth" / "gen.json"),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)
_damage("truncated lds/masks.npy -> lds",
        lambda r: truncate(r / "lds" / "masks.npy"),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)
_damage("lds/jobs.json invalid JSON -> lds",
        lambda r: bad_json(r / "lds" / "jobs.json"),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)
_damage("LDS subset model deleted -> lds",
        lambda r: delete(r / "lds" / "models" / "m001-s0"),
        ["lds", "--out", "{run}", "-q"], "recovered", _lds_equal)
_damage("truncated LDS subset model weights (truth deleted) -> lds",
        lambda r: (truncate(r / "lds/models/m001-s0/unet/diffusion_pytorch_model.safetensors"),
                   delete(r / "lds" / "truth")),
        ["lds", "--out", "{run}", "-q"], "clear-error")
_damage("truncated scores/trak/val.npy -> score",
        lambda r: truncate(r / "scores" / "trak" / "val.npy"),
        ["score", "--out", "{run}", "-q"], "clear-error|recovered")
_damage("truncated scores/dtrak/gen.npy -> report",
        lambda r: truncate(r / "scores" / "dtrak" / "gen.npy"),
        ["report", "{run}", "-q"], "clear-error")
_damage("scores/trak/val.json invalid JSON -> score",
        lambda r: bad_json(r / "scores" / "trak" / "val.json"),
        ["score", "--out", "{run}", "-q"], "clear-error|recovered")
_damage("scores/datamodel/val.npy deleted -> score",
        lambda r: delete(r / "scores" / "datamodel" / "val.npy"),
        ["score", "--out", "{run}", "-q"], "recovered", _scores_equal)
_damage("scores and results deleted -> score (prior lambda)",
        lambda r: (delete(r / "scores"), delete(r / "results")),
        ["score", "--out", "{run}", "-q"], "recovered", _scores_equal)
_damage("results/lds.json invalid JSON, scores deleted -> score",
        lambda r: (bad_json(r / "results" / "lds.json"), delete(r / "scores" / "trak")),
        ["score", "--out", "{run}", "-q"], "clear-error")
_damage("truncated results/lds_predictions.npz -> compare",
        lambda r: truncate(r / "results" / "lds_predictions.npz"),
        ["compare", "trak", "dtrak", "--out", "{run}"], "clear-error")
_damage("truncated pool/truth/val.npy, datamodel scores deleted -> score",
        lambda r: (truncate(r / "pool" / "truth" / "val.npy"), delete(r / "scores" / "datamodel")),
        ["score", "--out", "{run}", "-q"], "clear-error|recovered", _scores_equal)


def _other_pool_masks(r: Path) -> None:
    p = r / "pool" / "masks.npy"
    m = np.load(p)
    np.save(p, ~m)
    delete(r / "scores" / "datamodel")


_damage("pool/masks.npy replaced by other masks -> score",
        _other_pool_masks, ["score", "--out", "{run}", "-q"], "clear-error|recovered",
        _scores_equal)
_damage("truncated model weights (gen deleted) -> generate",
        lambda r: (truncate(r / "model/unet/diffusion_pytorch_model.safetensors"),
                   delete(r / "gen")),
        ["generate", "--out", "{run}", "-q"], "clear-error")
_damage("model config.json invalid JSON (features deleted) -> featurize",
        lambda r: (bad_json(r / "model" / "unet" / "config.json"), delete(r / "features")),
        ["featurize", "--out", "{run}", "-q"], "clear-error")
_damage("model/unet deleted -> train",
        lambda r: delete(r / "model" / "unet"),
        ["train", "--out", "{run}", "-q"], "recovered", _model_equal)
_damage("model/done.json invalid JSON -> train",
        lambda r: bad_json(r / "model" / "done.json"),
        ["train", "--out", "{run}", "-q"], "clear-error|recovered", _model_equal)
_damage("truncated checkpoint optimizer, unfinished model -> train",
        lambda r: (truncate(one(r, "model/checkpoints/step-*") / "optimizer.safetensors"),
                   delete(r / "model" / "unet"), delete(r / "model" / "done.json")),
        ["train", "--out", "{run}", "-q"], "clear-error|recovered", _model_equal)
_damage("checkpoint state.json invalid JSON, unfinished model -> train",
        lambda r: (bad_json(one(r, "model/checkpoints/step-*") / "state.json"),
                   delete(r / "model" / "unet"), delete(r / "model" / "done.json")),
        ["train", "--out", "{run}", "-q"], "clear-error|recovered", _model_equal)
_damage("run config.json invalid JSON -> lds",
        lambda r: bad_json(r / "config.json"),
        ["lds", "--out", "{run}", "-q"], "clear-error")
_damage("run config.json deleted -> lds",
        lambda r: delete(r / "config.json"),
        ["lds", "--out", "{run}", "-q"], "clear-error")
_damage("data/splits.json invalid JSON -> score",
        lambda r: bad_json(r / "data" / "splits.json"),
        ["score", "--out", "{run}", "-q"], "clear-error")


def _other_split(r: Path) -> None:
    p = r / "data" / "splits.json"
    d = json.loads(p.read_text())
    d["train"] = d["train"][::-1]
    p.write_text(json.dumps(d))


_damage("data/splits.json of another split -> score",
        _other_split, ["score", "--out", "{run}", "-q"], "clear-error")
_damage("truncated data/train_images.npy, a subset model deleted -> lds",
        lambda r: (truncate(r / "data" / "train_images.npy"),
                   delete(r / "lds" / "models" / "m000-s0")),
        ["lds", "--out", "{run}", "-q"], "clear-error|recovered", _lds_equal)


# ---------------------------------------------------------------------------- 4. stale


def _stale(name: str, item: str, compare: Callable[[Path, Path], tuple[bool, str]],
           argv_extra: tuple[str, ...] = ()) -> None:
    @case("stale", name, "recovered")
    def fn(ctx: Ctx) -> Outcome:
        run, fresh = ctx.copy_base(), ctx.fresh("-fresh")
        items = [*BASE_SETS, item]
        p = dtrak("run", TINY, "--out", run, "-q", "--overwrite", *sets(items))
        if p.rc != 0:
            return judge(p)
        ref = dtrak("run", TINY, "--out", fresh, "-q", *sets(items))
        if ref.rc != 0:
            return Outcome(error_class(ref), [p, ref], "the fresh reference run failed")
        return judge(p, lambda: compare(run, fresh), procs=[ref])


def _lds_and_scores(run: Path, fresh: Path) -> tuple[bool, str]:
    return all_of(lambda: same_lds(run, fresh), lambda: same_npys(run, fresh, "scores"))()


_stale("--overwrite sampling.gen_seed=1 == fresh run", "sampling.gen_seed=1",
       lambda a, b: all_of(lambda: same_lds(a, b), lambda: same_npys(a, b, "gen"))())
_stale("--overwrite lds.alpha=0.4 == fresh run (datamodel scores)", "lds.alpha=0.4",
       lambda a, b: all_of(lambda: same_lds(a, b),
                           lambda: same_npys(a, b, "scores/datamodel"))())
_stale("--overwrite attribution.proj_dim=32 == fresh run", "attribution.proj_dim=32",
       _lds_and_scores)
_stale("--overwrite train.lr=0.001 == fresh run", "train.lr=0.001", _lds_and_scores)


@case("stale", "a method added to a finished run keeps the other results", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    p = dtrak("lds", "--out", run, "-q", "--method", "trak", "--method", "dtrak",
              "--method", "datamodel", "--method", "random")

    def check() -> tuple[bool, str]:
        old = _lds_numbers(ctx.base)["records"]
        new = [r for r in _lds_numbers(run)["records"] if r["method"] != "random"]
        if old != new:
            return False, "the records of trak / dtrak / datamodel changed"
        return True, "old records unchanged, random added"
    return judge(p, check)


# ---------------------------------------------------------------------------- 5. kill


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d))
    return out


def descendants(pid: int) -> list[int]:
    kids, out, stack = _children_map(), [], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_then_rerun(ctx: Ctx, run: Path, argv: list, ready: Callable[[], bool],
                    delay: float, check: Check, rerun: list | None = None,
                    wait_workers: int = 0) -> Outcome:
    """Start ``argv``, SIGKILL it (only it, like the OOM killer would) ``delay`` s after
    ``ready()``, check that none of its child processes survives it, rerun, compare."""
    log = ctx.work / "cases" / f"{ctx.case.slug}.killed.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), cwd=REPO)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        if wait_workers:
            while (time.time() < deadline and proc.poll() is None
                   and len([c for c in descendants(proc.pid)
                            if "spawn_main" in _cmdline(c)]) < wait_workers):
                time.sleep(0.1)
        time.sleep(delay)
        finished_first = proc.poll() is not None
        kids = descendants(proc.pid)
        kid_cmds = {k: _cmdline(k) for k in kids}
        if not finished_first:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = Proc([str(a) for a in argv], proc.returncode, "", log.read_text(), time.time() - t0)
    note = (f"killed after {time.time() - t0:.1f} s with {len(kids)} child process(es)"
            if not finished_first else "the command finished before the kill (timing)")
    # workers must die with their parent: give them a few seconds
    end = time.time() + 20
    while time.time() < end and any(alive(k) for k in kids):
        time.sleep(0.2)
    orphans = [k for k in kids if alive(k) and _cmdline(k) == kid_cmds[k]]
    strays = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()
              and str(run) in _cmdline(int(d)) and alive(int(d))]
    if orphans or strays:
        for pid in set(orphans) | set(strays):  # our own children: end them
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return Outcome("silent", [killed], note + "; processes outlived the killed parent: "
                       + ", ".join(f"{p} ({_cmdline(p)[:80]})" for p in orphans + strays))
    p = dtrak(*(rerun or argv[1:]))
    return judge(p, check, procs=[killed], note=note)


def _kill_case(name: str, prepare: Callable[[Path], None], args: list[str],
               ready: Callable[[Path], bool], delay: float,
               check: Callable[[Path, Path], tuple[bool, str]], wait_workers: int = 0) -> None:
    @case("kill", name, "recovered", serial=True)
    def fn(ctx: Ctx) -> Outcome:
        run = ctx.copy_base()
        prepare(run)
        argv = [DTRAK, *[a.replace("{run}", str(run)) for a in args]]
        return kill_then_rerun(ctx, run, argv, lambda: ready(run), delay,
                               lambda: check(run, ctx.base), wait_workers=wait_workers)


def _rm(*subs: str) -> Callable[[Path], None]:
    return lambda r: [delete(r / s) for s in subs]


_LATER = ("stages.json", "report")
_kill_case("SIGKILL in train, rerun train", _rm("model", *_LATER),
           ["train", "--out", "{run}", "-q"],
           lambda r: (r / "model").exists(), 1.0, _model_equal)
_kill_case("SIGKILL in generate, rerun generate", _rm("gen", *_LATER),
           ["generate", "--out", "{run}", "-q"],
           lambda r: (r / "gen" / "done.npy").exists(), 0.0, _gen_equal)
_kill_case("SIGKILL in featurize, rerun featurize", _rm("features", *_LATER),
           ["featurize", "--out", "{run}", "-q"],
           lambda r: (r / "features" / "full" / "train").exists(), 0.5, _feats_equal)
_kill_case("SIGKILL in score (pool training), rerun score",
           _rm("scores", "results", "pool", *_LATER),
           ["score", "--out", "{run}", "-q"],
           lambda r: (r / "pool" / "models").exists(), 0.5,
           lambda r, b: all_of(lambda: same_npys(r, b, "scores"),
                               lambda: same_npys(r, b, "pool"))())
_kill_case("SIGKILL in lds, rerun lds", _rm("lds", "results", *_LATER),
           ["lds", "--out", "{run}", "-q"],
           lambda r: (r / "lds" / "models" / "m000-s0").exists(), 0.5, _lds_equal)
_kill_case("SIGKILL in lds --workers 2 (no orphan workers), rerun",
           _rm("lds", "results", *_LATER),
           ["lds", "--out", "{run}", "-q", "--workers", "2"],
           lambda r: (r / "lds" / "models" / "m000-s0").exists()
           or (r / "lds" / "models" / "m001-s0").exists(), 0.0, _lds_equal, wait_workers=2)
_kill_case("SIGKILL in featurize --shards 2 (no orphan workers), rerun",
           _rm("features", *_LATER),
           ["featurize", "--out", "{run}", "-q", "--shards", "2", "--set", "runtime.workers=2"],
           lambda r: (r / "features" / "full" / "train").exists(), 1.0, _feats_equal,
           wait_workers=2)


def _kill_between_stores(r: Path) -> None:
    # What a SIGKILL between the writes of one batch to its output stores leaves (the loss
    # rows done, the square rows not): the random kill above hits it only now and then.
    p = one(r, "features/full/val/square-*") / "done.npy"
    done = np.load(p)
    done[:] = 0  # the val set (6 targets) is one batch
    np.save(p, done)


@case("kill", "kill between the output stores of one batch (state simulated), featurize",
      "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    _kill_between_stores(run)
    return judge(dtrak("featurize", "--out", run, "-q"), lambda: _feats_equal(run, ctx.base))


@case("kill", "SIGKILL in dtrak run (featurize), rerun dtrak run", "recovered", serial=True)
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    for s in ("features", "scores", "lds", "pool", "results", *_LATER):
        delete(run / s)
    argv = [DTRAK, "run", TINY, "--out", run, "-q", *sets(BASE_SETS)]
    return kill_then_rerun(
        ctx, run, argv, lambda: (run / "features" / "full" / "val").exists(), 0.3,
        all_of(lambda: same_npys(run, ctx.base, "features"),
               lambda: same_npys(run, ctx.base, "scores"),
               lambda: _lds_equal(run, ctx.base)))


# ---------------------------------------------------------------------------- 6. rundir


@case("rundir", "moved run continues (lds, no retraining)", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base("-tmp")
    moved = ctx.fresh()
    shutil.move(str(run), str(moved))
    pattern = "**/unet/diffusion_pytorch_model.safetensors"
    before = mtimes(moved, pattern)
    p = dtrak("lds", "--out", moved, "-q")
    return judge(p, all_of(mtimes_kept(moved, before, pattern),
                           lambda: same_lds(moved, ctx.base)))


@case("rundir", "finished run run again: nothing recomputed", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    keep = "**/*.safetensors"
    before = mtimes(run, keep) | mtimes(run, "features/**/*.npy") | mtimes(run, "scores/**/*.npy")
    p = dtrak("run", TINY, "--out", run, "-q", *sets(BASE_SETS))

    def check() -> tuple[bool, str]:
        after = mtimes(run, keep) | mtimes(run, "features/**/*.npy") | mtimes(run, "scores/**/*.npy")
        if after != before:
            return False, "models, features or scores were rewritten"
        return same_lds(run, ctx.base)
    return judge(p, check)


@case("rundir", "result-neutral change (--workers 2) on a finished run", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    pattern = "**/*.safetensors"
    before = mtimes(run, pattern)
    p = dtrak("lds", "--out", run, "-q", "--workers", "2")
    return judge(p, all_of(mtimes_kept(run, before, pattern), lambda: same_lds(run, ctx.base)))


@case("rundir", "failed first command (bad data root), corrected retry", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.fresh()
    procs: list[Proc] = []
    bad = dtrak("data", "--config", TINY, "--out", run, "-q",
                *sets(["data.name=imagefolder", f'data.root="{ctx.work}/no-such-folder"']))
    if (o := expect_error_first(bad, procs)) is not None:
        return o
    p = dtrak("data", "--config", TINY, "--out", run, "-q")
    return judge(p, lambda: (
        (run / "data" / "splits.json").read_text()
        == (ctx.base / "data" / "splits.json").read_text(), "splits equal the base run's"),
        procs=procs)


@case("rundir", "failed first command (bad value), corrected retry", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.fresh()
    procs: list[Proc] = []
    bad = dtrak("train", "--config", TINY, "--out", run, "-q",
                *sets([*BASE_SETS, "model.preset=huge"]))
    if (o := expect_error_first(bad, procs)) is not None:
        return o
    p = dtrak("train", "--config", TINY, "--out", run, "-q", *sets(BASE_SETS))
    return judge(p, lambda: _model_equal(run, ctx.base), procs=procs)


@case("rundir", "different config into a finished run without --overwrite", "clear-error")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    before = snapshot(run)
    p = dtrak("train", "--config", TINY, "--out", run, "-q",
              *sets([*BASE_SETS, "train.steps=20"]))
    ok, why = untouched(run, before)()
    out = judge(p)
    if not ok:
        return Outcome("silent", out.procs, why)
    return out


@case("rundir", "report --to DIR leaves the run untouched", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    before = snapshot(run)
    to = ctx.fresh("-report")
    p = dtrak("report", run, "--to", to, "-q")
    return judge(p, all_of(untouched(run, before),
                           lambda: ((to / "index.html").is_file(), "index.html written")))


@case("rundir", "compare leaves the run untouched", "recovered")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    before = snapshot(run)
    p = dtrak("compare", "trak", "dtrak", "--out", run)
    return judge(p, all_of(untouched(run, before),
                           lambda: ("LDS(trak) - LDS(dtrak)" in p.out, "difference printed")))


@case("rundir", "report of a directory that is no run", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("report", ctx.inputs(), "-q"))


# ---------------------------------------------------------------------------- 7. fs
# Not simulated (see the module docstring): a read-only run directory, a full disk.


def _regular_file(ctx: Ctx) -> Path:
    f = ctx.inputs() / "a-file"
    f.write_text("I am a file\n")
    return f


@case("fs", "--out is a regular file (data)", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("data", "--config", TINY, "--out", _regular_file(ctx), "-q"))


@case("fs", "--out is a regular file (run)", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("run", TINY, "--out", _regular_file(ctx), "-q"))


@case("fs", "report RUN where RUN is a regular file", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("report", _regular_file(ctx), "-q"))


@case("fs", "--out below a regular file", "clear-error")
def _(ctx: Ctx) -> Outcome:
    return judge(dtrak("data", "--config", TINY, "--out", _regular_file(ctx) / "run", "-q"))


@case("fs", "config.json of the run is a directory", "clear-error")
def _(ctx: Ctx) -> Outcome:
    run = ctx.copy_base()
    delete(run / "config.json")
    (run / "config.json").mkdir()
    return judge(dtrak("lds", "--out", run, "-q"))


def _fsize_case(name: str, prepare: Callable[[Path], None], args: list[str], limit: int,
                check: Callable[[Path, Path], tuple[bool, str]]) -> None:
    @case("fs", name, "recovered")
    def fn(ctx: Ctx) -> Outcome:
        run = ctx.copy_base()
        prepare(run)
        argv = [a.replace("{run}", str(run)) for a in args]
        procs: list[Proc] = []
        if (o := expect_error_first(dtrak(*argv, fsize=limit), procs)) is not None:
            return o
        return judge(dtrak(*argv), lambda: check(run, ctx.base), procs=procs,
                     note="first: clear error at the file-size limit")


_fsize_case("file-size limit (disk full) in featurize, then rerun", _rm("features", *_LATER),
            ["featurize", "--out", "{run}", "-q"], 8_000, _feats_equal)
_fsize_case("file-size limit (disk full) in train, then rerun", _rm("model", *_LATER),
            ["train", "--out", "{run}", "-q"], 100_000, _model_equal)
_fsize_case("file-size limit (disk full) in lds, then rerun", _rm("lds", "results", *_LATER),
            ["lds", "--out", "{run}", "-q"], 100_000, _lds_equal)


# ============================================================================ driver


def build_base(work: Path) -> None:
    base = work / "base"
    delete(base)
    print(f"building the base run in {base} ...", file=sys.stderr, flush=True)
    p = dtrak("run", TINY, "--out", base, "-q", *sets(BASE_SETS))
    if p.rc != 0 or not (base / "results" / "lds.json").exists():
        sys.exit(f"the base run failed ({p.command}):\n{p.err[-3000:]}")
    (work / "base.ok").write_text(json.dumps({"seconds": p.seconds}))
    print(f"base run built in {p.seconds:.0f} s", file=sys.stderr, flush=True)


def run_case(work: Path, c: Case) -> tuple[Case, Outcome, float]:
    t0 = time.time()
    try:
        out = c.fn(Ctx(work, c))
    except Exception:
        out = Outcome("harness-error", [], traceback.format_exc())
    dt = time.time() - t0
    print(f"  {c.category:<8} {c.name[:60]:<60} {out.got:<14} {dt:6.1f} s", file=sys.stderr,
          flush=True)
    return c, out, dt


def ok(c: Case, out: Outcome) -> bool:
    return out.got in c.expected.split("|") and out.got not in DEFECTS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/dtrak-faults", help="scratch directory")
    ap.add_argument("--only", choices=CATEGORIES, action="append",
                    help="run only this category (repeatable)")
    ap.add_argument("--case", action="append", default=None,
                    help="run only cases whose name contains TEXT (repeatable)")
    ap.add_argument("--all", action="store_true",
                    help=f"also the {len(EXTENDED)} extended cases (more variants of each fault)")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once (kill cases alone)")
    ap.add_argument("--reuse-base", action="store_true",
                    help="reuse WORK/base from an earlier call (faster; stale if src changed)")
    ap.add_argument("--md", default=None, help="also write the table and details to this file")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    unknown = EXTENDED - {c.name for c in CASES}
    assert not unknown, f"EXTENDED names no case: {sorted(unknown)}"
    chosen = [c for c in CASES if (not args.only or c.category in args.only)
              and (args.all or args.case is not None or c.name not in EXTENDED)
              and (args.case is None or any(t.lower() in c.name.lower() for t in args.case))]
    if not chosen:
        sys.exit("no case matches")
    t0 = time.time()
    if not (args.reuse_base and (work / "base.ok").exists()):
        build_base(work)
    print(f"{len(chosen)} cases", file=sys.stderr, flush=True)
    results: dict[int, tuple[Case, Outcome, float]] = {}
    order = {id(c): i for i, c in enumerate(chosen)}
    parallel = [c for c in chosen if not c.serial]
    with ThreadPoolExecutor(max(1, args.jobs)) as ex:
        for c, out, dt in ex.map(lambda c: run_case(work, c), parallel):
            results[order[id(c)]] = (c, out, dt)
    for c in (c for c in chosen if c.serial):
        results[order[id(c)]] = run_case(work, c)

    rows = [results[i] for i in range(len(chosen))]
    lines = ["| category | case | expected | got | seconds |", "|---|---|---|---|---|"]
    for c, out, dt in rows:
        got = out.got if ok(c, out) else f"**{out.got}**"
        lines.append(f"| {c.category} | {c.name} | {c.expected.replace('|', ' or ')} | {got} "
                     f"| {dt:.1f} |")
    lines.append("")
    for cat in CATEGORIES:
        outs = [out.got for c, out, _ in rows if c.category == cat]
        if not outs:
            continue
        n = {k: outs.count(k) for k in CLASSES}
        other = len(outs) - sum(n.values())
        lines.append(f"- {cat}: {len(outs)} cases: {n['clear-error']} clear errors, "
                     f"{n['recovered']} recovered, {n['traceback']} tracebacks, "
                     f"{n['silent']} silent" + (f", {other} other" if other else ""))
    kills = [(c, out) for c, out, _ in rows if c.category == "kill" and ok(c, out)]
    if kills:
        lines.append("\nWhere the kills landed (a kill after the command finished tests "
                     "nothing; rerun the case):")
        lines += [f"- {c.name}: {out.note}" for c, out in kills]
    bad = [(c, out) for c, out, _ in rows if not ok(c, out)]
    lines.append(f"\n{len(rows)} cases in {time.time() - t0:.0f} s; "
                 f"{len(bad)} defect(s) or unexpected outcome(s)")
    if bad:
        lines.append("\n## Defects and unexpected outcomes\n")
    for c, out in bad:
        lines.append(f"### {c.category}: {c.name} (expected {c.expected.replace('|', ' or ')},"
                     f" got {out.got})\n")
        if out.note:
            lines.append(f"note: {out.note}\n")
        for p in out.procs:
            tail = "\n".join(p.err.strip().splitlines()[-12:])
            lines.append(f"    $ {p.command}\n    exit {p.rc}\n"
                         + "\n".join("    " + ln for ln in tail.splitlines()) + "\n")
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
