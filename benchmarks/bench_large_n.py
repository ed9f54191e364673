"""Large-N attribution from a feature store on disk: memory flat in N, time linear in N.

For each training-set size N, synthetic float32 features ``[N, k]`` are written to a
sharded store on disk (a child process), then another child process

1. accumulates ``Phi^T Phi`` block by block and factorises it (:mod:`dtrak.streaming`),
2. answers the top-100 proponents and opponents of one target, then of ``--targets`` targets
   in one pass, and reports its peak resident memory (``getrusage``, one process per size so
   the peaks do not mix);

and, where ``Phi`` fits in memory (``--compare-max-gb``), a third child scores the same
targets with the in-memory ``KernelSolver(form="primal")`` and checks that the streamed
exact top-100 equals the in-memory one. The store is deleted after each size (``--keep``
keeps it).

    python benchmarks/bench_large_n.py                      # N = 10^4, 10^5 at k = 4096
    python benchmarks/bench_large_n.py --huge               # and 10^6 (16 GB on disk)
    python benchmarks/bench_large_n.py --sizes 10000 --k 1024   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dtrak.scoring import KernelSolver
from dtrak.store import ShardedStore
from dtrak.streaming import StreamingKernel, accumulate_gram, stream_scores, top_from_scores

SHARD_ROWS = 65536
WRITE_ROWS = 8192
LAM_REL = 0.1


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _features(rng: np.random.Generator, rows: int, scale: np.ndarray) -> np.ndarray:
    return rng.standard_normal((rows, scale.size), dtype=np.float32) * scale


# --------------------------------------------------------------------------- children
def generate(directory: Path, n: int, k: int, n_targets: int, seed: int) -> dict:
    """Write the synthetic store (shard by shard, seeded per block) and the targets."""
    scale = np.linspace(0.1, 2.0, k, dtype=np.float32)  # a spread-out spectrum
    store = ShardedStore(directory / "store", n, k, {"synthetic": seed}, SHARD_ROWS)
    t0 = time.perf_counter()
    for start in range(0, n, WRITE_ROWS):
        stop = min(start + WRITE_ROWS, n)
        rng = np.random.default_rng([seed, start])
        store.write(np.arange(start, stop), _features(rng, stop - start, scale))
    targets = _features(np.random.default_rng([seed, n + 1]), n_targets, scale)
    np.save(directory / "targets.npy", targets)
    return {"write_s": time.perf_counter() - t0}


def measure(directory: Path, top: int) -> dict:
    """Factorise from the store, then top-m for 1 and for all targets; peak RSS."""
    store = ShardedStore.open(directory / "store")
    targets = np.load(directory / "targets.npy")
    t0 = time.perf_counter()
    gram = accumulate_gram(store, directory / "kernel")
    t1 = time.perf_counter()
    kernel = StreamingKernel.from_gram(gram, store.n)
    del gram
    t2 = time.perf_counter()
    lam = LAM_REL * kernel.trace_scale
    stream_scores(kernel, store, targets[:1], lam, top=top)
    t3 = time.perf_counter()
    found = stream_scores(kernel, store, targets, lam, top=top)
    t4 = time.perf_counter()
    np.save(directory / "proponents.npy", found.proponents)
    np.save(directory / "opponents.npy", found.opponents)
    return {"gram_s": t1 - t0, "eigh_s": t2 - t1, "query1_s": t3 - t2,
            "per_target_s": (t4 - t3) / len(targets), "lam": lam,
            "peak_rss_mb": _peak_rss_mb()}


def compare(directory: Path, top: int, lam: float) -> dict:
    """The in-memory solver's top-m against the streamed one."""
    store = ShardedStore.open(directory / "store")
    targets = np.load(directory / "targets.npy")
    t0 = time.perf_counter()
    solver = KernelSolver(store.load(), form="primal")
    scores = solver.scores(targets, lam)
    ref = top_from_scores(scores, top)
    pro = np.load(directory / "proponents.npy")
    opp = np.load(directory / "opponents.npy")
    rows_equal = int(np.sum(np.all(ref.proponents == pro, axis=1)
                            & np.all(ref.opponents == opp, axis=1)))
    sets_equal = all(set(a) == set(b) for a, b in zip(ref.proponents, pro, strict=True))
    return {"memory_s": time.perf_counter() - t0, "memory_rss_mb": _peak_rss_mb(),
            "top_rows_equal": rows_equal, "top_sets_equal": sets_equal,
            "targets": len(targets)}


# --------------------------------------------------------------------------- parent
def _child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_size(root: Path, n: int, args: argparse.Namespace) -> dict:
    directory = root / f"n{n}"
    directory.mkdir(parents=True, exist_ok=True)
    disk_gb = n * args.k * 4 / 1e9
    free_gb = shutil.disk_usage(root).free / 1e9
    if disk_gb * 1.1 > free_gb:
        raise SystemExit(f"N = {n} needs {disk_gb:.1f} GB on disk, {free_gb:.1f} GB free in "
                         f"{root}; pass --dir on a larger disk")
    row = {"n": n, "k": args.k, "disk_gb": disk_gb}
    try:
        row |= _child("generate", str(directory), str(n), str(args.k), str(args.targets),
                      str(args.seed))
        row |= _child("measure", str(directory), str(args.top))
        fits = 20 * n * args.k / 1e9 <= args.compare_max_gb  # phi f32 + f64 + Phi V
        if fits:
            row |= _child("compare", str(directory), str(args.top), repr(row["lam"]))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| N | k | disk GB | Gram s | eigh s | top-100, 1 target s | per target s "
            "(batch) | peak RSS MB | in-memory RSS MB | exact top = in-memory |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        exact = ("-" if "top_rows_equal" not in r else
                 f"{r['top_rows_equal']}/{r['targets']} rows"
                 + (", sets equal" if r["top_sets_equal"] else ", SETS DIFFER"))
        mem = f"{r['memory_rss_mb']:.0f}" if "memory_rss_mb" in r else "-"
        lines.append(f"| {r['n']:,} | {r['k']} | {r['disk_gb']:.2f} | {r['gram_s']:.2f} | "
                     f"{r['eigh_s']:.2f} | {r['query1_s']:.3f} | {r['per_target_s']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {mem} | {exact} |")
    for a, b in zip(rows, rows[1:], strict=False):
        f = b["n"] / a["n"]
        lines.append(f"\nN x{f:g}: Gram x{b['gram_s'] / a['gram_s']:.2f}, top-100 query x"
                     f"{b['query1_s'] / a['query1_s']:.2f}, per target x"
                     f"{b['per_target_s'] / a['per_target_s']:.2f}, peak RSS x"
                     f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    p.add_argument("--huge", action="store_true", help="add N = 10^6 (16 GB at k = 4096)")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--targets", type=int, default=8, help="targets of the batched pass")
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--compare-max-gb", type=float, default=4.0,
                   help="compare with the in-memory solver when it needs at most this")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, directory, *rest = args.child
        fn = {"generate": lambda: generate(Path(directory), *map(int, rest)),
              "measure": lambda: measure(Path(directory), int(rest[0])),
              "compare": lambda: compare(Path(directory), int(rest[0]), float(rest[1]))}[kind]
        print(json.dumps(fn()))
        return
    sizes = [int(s) for s in args.sizes.split(",")] + ([10**6] if args.huge else [])
    root = Path(tempfile.mkdtemp(prefix="dtrak-large-n-", dir=args.dir))
    rows = []
    try:
        for n in sizes:
            rows.append(run_size(root, n, args))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if any("top_sets_equal" in r and not r["top_sets_equal"] for r in rows):
        raise SystemExit("the streamed top-k differs from the in-memory top-k")


if __name__ == "__main__":
    main()
