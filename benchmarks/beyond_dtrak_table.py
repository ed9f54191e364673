"""TRAK, D-TRAK, DAS and K-FAC / EK-FAC influence on one run: LDS, paired differences, cost.

    python benchmarks/beyond_dtrak_table.py bench-runs/cifar2 > /tmp/beyond.md

Reads results/lds.json and results/lds_predictions.npz of a run whose LDS stage evaluated
the methods (benchmarks/beyond_dtrak.sh) and prints, per target set (val, gen), each
method's LDS with its 95% interval (held-out lambda), the paired difference against D-TRAK
with its 95% interval (:func:`dtrak.stages.lds.compare`: both methods bootstrapped on the
same resampled subsets), and the seconds each method took in the LDS stage (the features,
factors and scores it computed there; D-TRAK's and TRAK's features come from the featurize
stage, whose time the run's log gives). Verdict rule, fixed before reading the numbers: a
method "beats" D-TRAK when the paired interval lies above 0, "loses" when below, "not
separated" otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dtrak.pipeline import open_run
from dtrak.stages.lds import compare

METHODS = ("trak", "dtrak", "das", "das-sq", "das-loo", "das-loo-sq", "kfac-if", "ekfac-if")
REFERENCE = "dtrak"


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "beats D-TRAK"
    if high < 0:
        return "loses to D-TRAK"
    return "not separated"


def main(root: str) -> None:
    run = open_run(root)
    results = json.loads((Path(root) / "results" / "lds.json").read_text())
    by = {(r["method"], r["targets"]): r for r in results["records"]
          if r.get("lambda_selection") in ("heldout", None)}
    s = results["settings"]
    print(f"Settings: M = {s['n_subsets']} subsets (alpha {s['alpha']}), seeds {s['seeds']}, "
          f"ground truth over {s['eval_timesteps']} timesteps; K = "
          f"{s['attribution']['n_timesteps']}, k = {s['attribution']['proj_dim']} "
          f"({s['attribution']['projector']}); held-out lambda; 95% percentile bootstrap over "
          f"subsets ({s['n_boot']} resamples)\n")
    print("| method | val LDS % | val − D-TRAK | gen LDS % | gen − D-TRAK | seconds (val + gen) |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        cells, seconds = [], 0.0
        for t in ("val", "gen"):
            r = by.get((m, t))
            if r is None:
                cells += ["(not run)", ""]
                continue
            seconds += r.get("seconds", float("nan"))
            cells.append(f"{r['lds']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}]")
            if m == REFERENCE:
                cells.append("")
                continue
            d = compare(run, m, REFERENCE, t)
            cells.append(f"{d['diff']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] "
                         f"({verdict(d['ci_low'], d['ci_high'])})")
        print(f"| {m} | " + " | ".join(cells) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-runs/cifar2")
