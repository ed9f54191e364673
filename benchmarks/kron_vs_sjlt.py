"""LDS(kron) - LDS(sjlt) across two run directories on the same LDS pool (issue 20).

``dtrak compare`` compares two methods of ONE run; here the two projectors are two runs
(benchmarks/kron_vs_sjlt.sh: RUN with sjlt, RUN-kron whose model, generated images and LDS
pool are links into RUN). Both runs' saved LDS predictions (results/lds_predictions.npz,
``[M, T]`` per method, target set and lambda selection) are scored against the same ground
truth (RUN/lds/truth/<set>.npy) with :func:`dtrak.lds.difference`: both on the same
bootstrap resamples of the M subsets, so the interval is that of the difference itself.
The held-out selection's target weights (equal weight to its two target halves) come from
the kron run and are checked to equal the sjlt run's.

    .venv/bin/python benchmarks/kron_vs_sjlt.py RUN RUN-kron [--out FILE.json]

Any two runs on the same pool compare the same way (``--labels`` names them in the table),
e.g. sjlt with projection seed 1 against sjlt with seed 0: the seed-to-seed difference the
subset bootstrap does not include, the yardstick for kron - sjlt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dtrak import lds as lds_math


def records(run: Path) -> dict:
    out = json.loads((run / "results" / "lds.json").read_text())
    return {(r["method"], r["targets"], r["lambda_selection"]): r for r in out["records"]}


def true_k(run: Path) -> dict:
    """feature name -> (k, p) from the run's feature stores' metadata."""
    found = {}
    for meta in sorted((run / "features").rglob("*.json")):
        try:
            m = json.loads(meta.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(m, dict) and "projector" in m and "feature" in m:
            desc = m["projector"]
            found[m["feature"]] = {"k": desc.get("k"), "p": m.get("p"), "projector": desc}
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sjlt_run", type=Path)
    ap.add_argument("kron_run", type=Path)
    ap.add_argument("--methods", default="trak,dtrak")
    ap.add_argument("--targets", default="val,gen")
    ap.add_argument("--n-boot", type=int, default=None, help="default: the run's lds.n_boot")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--labels", default="kron,sjlt",
                    help="names of the second and first run in the table (default kron,sjlt)")
    args = ap.parse_args()
    la, lb = args.labels.split(",")
    a, b = args.kron_run, args.sjlt_run
    pa = np.load(a / "results" / "lds_predictions.npz")
    pb = np.load(b / "results" / "lds_predictions.npz")
    ra, rb = records(a), records(b)
    cfg = json.loads((b / "config.json").read_text())
    n_boot = args.n_boot or cfg.get("lds", {}).get("n_boot", 1000)
    rows = []
    for set_name in args.targets.split(","):
        truth = np.load(b / "lds" / "truth" / f"{set_name}.npy")
        truth_a = np.load(a / "lds" / "truth" / f"{set_name}.npy")
        assert np.array_equal(truth, truth_a), "the two runs have different ground truth"
        for method in args.methods.split(","):
            for sel in ("heldout", "paper"):
                key = f"{method}/{set_name}/{sel}"
                w = pa[key + "/weights"] if key + "/weights" in pa.files else None
                if w is not None and key + "/weights" in pb.files:
                    assert np.allclose(w, pb[key + "/weights"]), "held-out weights differ"
                d = lds_math.difference(pa[key], pb[key], truth, w, n_boot=n_boot)
                rk, rs = ra[(method, set_name, sel)], rb[(method, set_name, sel)]
                rows.append({"method": method, "targets": set_name, "selection": sel,
                             "n_subsets": int(pa[key].shape[0]),
                             "n_targets": int(pa[key].shape[1]),
                             "lds_kron": rk["lds"], "ci_kron": [rk["ci_low"], rk["ci_high"]],
                             "lds_sjlt": rs["lds"], "ci_sjlt": [rs["ci_low"], rs["ci_high"]],
                             **d})
    ks = true_k(a)
    kb = true_k(b)
    print(f"{la} run {a}, {lb} run {b}; LDS in %, 95% bootstrap intervals over the "
          f"{rows[0]['n_subsets']} subsets ({n_boot} resamples); diff = {la} - {lb}, paired")
    print()
    print(f"| method | targets | lambda sel. | LDS {la} [95% CI] | LDS {lb} [95% CI] "
          f"| {la} - {lb} [paired 95% CI] | P(diff <= 0) |")
    print("|---|---|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['targets']} | {r['selection']} "
              f"| {r['lds_kron']:.2f} [{r['ci_kron'][0]:.2f}, {r['ci_kron'][1]:.2f}] "
              f"| {r['lds_sjlt']:.2f} [{r['ci_sjlt'][0]:.2f}, {r['ci_sjlt'][1]:.2f}] "
              f"| {r['diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] "
              f"| {r['p_le_0']:.3f} |")
    print()
    for name, info in sorted({**{f"{lb} {n}": v for n, v in kb.items()},
                              **{f"{la} {n}": v for n, v in ks.items()}}.items()):
        print(f"features {name}: k = {info['k']}, p = {info['p']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"a": {"label": la, "run": str(a)},
                                        "b": {"label": lb, "run": str(b)},
                                        "note": "lds_kron/ci_kron: run a; lds_sjlt/ci_sjlt: "
                                                "run b; diff = a - b",
                                        "rows": rows, "features_a": ks, "features_b": kb,
                                        "n_boot": n_boot}, indent=2, default=float))


if __name__ == "__main__":
    main()
