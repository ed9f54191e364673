"""Tables and claim-by-claim verdicts of the CIFAR-2 benchmark, in markdown.

    python benchmarks/cifar2_tables.py bench-runs/cifar2 > /tmp/tables.md

Reads a finished run of ``configs/cifar2-bench.toml`` (results/lds.json,
results/lds_predictions.npz, results/counterfactual.json) and prints the paper's tables
(SPEC section 6) with this run's LDS and 95% intervals beside the paper's values, then the
four headline claims, each decided by a paired bootstrap interval of the LDS difference
(:func:`dtrak.stages.lds.compare`): "holds" when the interval lies on the claimed side of 0,
"reversed" when it lies on the other side, "not separated" when it contains 0.
Nothing here is tuned: the verdict rule is fixed before looking at the numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dtrak.pipeline import open_run
from dtrak.stages.lds import compare

# paper Table 1 (k = 4096): output -> (val K10, val K100, gen K10, gen K100)
PAPER_ABLATION = {
    "loss": (10.66, 19.50, 5.14, 12.05), "elbo": (8.46, 9.07, 3.49, 3.83),
    "square": (24.78, 30.81, 16.20, 22.62), "avg": (24.91, 29.15, 16.76, 20.82),
    "l1": (23.44, 30.36, 15.10, 21.99), "l2": (24.72, 30.91, 15.75, 22.44),
    "linf": (5.22, 11.54, 3.99, 8.11),
}
# paper main table (k = 32768): method -> (val K10, val K100, gen K10, gen K100)
PAPER_MAIN = {
    "random": "≈ 0", "pixel-dot": "≈ 8 / 5", "pixel-cos": "≈ 8 / 5",
    "grad-dot": "3–6", "grad-cos": "3–6", "tracin-dot": "3–6", "tracin-cos": "3–6",
    "relative-if": "≈ TRAK", "renorm-if": "≈ TRAK",
    "trak": "11.5 / 24.0 / 5.9 / 16.1", "journey-trak": "gen 7.9 / 12.4",
    "dtrak": "27.2 / 34.2 / 19.1 / 26.0",
}
OUTPUT_METHOD = {"loss": "trak", "elbo": "kernel-elbo", "square": "dtrak", "avg": "kernel-avg",
                 "l1": "kernel-l1", "l2": "kernel-l2", "linf": "kernel-linf"}
K_DEPENDENT = {"grad-dot", "grad-cos", "relative-if", "renorm-if", "trak", "journey-trak",
               "dtrak"}


def _at(name: str, k: int) -> str:
    return name if k == 10 else f"{name}@{k}"


class Tables:
    def __init__(self, run_dir: str):
        self.run = open_run(run_dir, None, progress=False)
        self.lds = json.loads((self.run.paths.results / "lds.json").read_text())
        self.rec = {(r["method"], r["targets"], r["lambda_selection"]): r
                    for r in self.lds["records"]}

    def cell(self, method: str, targets: str, selection: str) -> str:
        r = self.rec.get((method, targets, selection)) or self.rec.get((method, targets, None))
        if r is None:
            return "—"
        return f"{r['lds']:.1f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}]"

    def settings(self) -> str:
        s, cfg = self.lds["settings"], self.run.cfg
        return (f"{cfg.data.train_size} train images ({cfg.data.name}, {cfg.data.resolution}×"
                f"{cfg.data.resolution}), UNet {cfg.model.preset} {list(cfg.model.block_out_channels or [])}, "
                f"{cfg.train.epochs or cfg.train.steps} {'epochs' if cfg.train.epochs else 'steps'}; M = {s['n_subsets']} subsets (α = {s['alpha']}), "
                f"seeds {s['seeds']}, ground truth over {s['eval_timesteps']} timesteps; "
                f"{cfg.attribution.n_targets} targets per set; k = {cfg.attribution.proj_dim} "
                f"({cfg.attribution.projector}); 95% percentile bootstrap over subsets "
                f"({s['n_boot']} resamples)")

    def ablation(self, selection: str) -> list[str]:
        lines = ["| output f | val K=10 | val K=100 | gen K=10 | gen K=100 |",
                 "|---|---|---|---|---|"]
        for out, method in OUTPUT_METHOD.items():
            paper = PAPER_ABLATION[out]
            cells = [f"{self.cell(_at(method, k), t, selection)} ({paper[i]})"
                     for i, (t, k) in enumerate([("val", 10), ("val", 100), ("gen", 10),
                                                 ("gen", 100)])]
            lines.append(f"| {out} | " + " | ".join(cells) + " |")
        return lines

    def main_table(self, selection: str) -> list[str]:
        lines = ["| method | val K=10 | val K=100 | gen K=10 | gen K=100 | paper |",
                 "|---|---|---|---|---|---|"]
        for method, paper in PAPER_MAIN.items():
            cells = []
            for t, k in [("val", 10), ("val", 100), ("gen", 10), ("gen", 100)]:
                if k == 100 and method not in K_DEPENDENT:
                    cells.append("(no K)")
                else:
                    cells.append(self.cell(_at(method, k), t, selection))
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {paper} |")
        return lines

    def lambdas(self, ks: tuple[int, ...] = (10, 100)) -> list[str]:
        """The chosen λ of each kernel, relative to trace(ΦᵀΦ)/N, with grid-edge flags."""
        curves = {(c["method"], c["targets"]): c for c in self.lds["lds_by_lambda"]}
        lines = ["| output f | K | targets | λ / (trace/N), paper | held-out (A, B) | "
                 "LDS at best λ vs grid edges |", "|---|---|---|---|---|---|"]
        for out, method in OUTPUT_METHOD.items():
            for k in ks:
                for t in ("val", "gen"):
                    m = _at(method, k)
                    r = self.rec.get((m, t, "paper"))
                    h = self.rec.get((m, t, "heldout"))
                    c = curves.get((m, t))
                    if r is None or c is None:
                        continue
                    lams, vals = np.array(c["lambdas"]), np.array(c["lds"])
                    scale = r["lambda"] / r["lambda_rel"]
                    best = int(np.nanargmax(vals))
                    edge = " (grid edge)" if best in (0, len(lams) - 1) else ""
                    held = ", ".join(f"{x / scale:.2g}" for x in h.get("lambdas_heldout", []))
                    lines.append(f"| {out} | {k} | {t} | {r['lambda_rel']:.2g}{edge} | {held} | "
                                 f"{vals[best]:.1f} vs {vals[0]:.1f} (smallest λ) / "
                                 f"{vals[-1]:.1f} (largest) |")
        return lines

    def class_agreement(self, top: int = 10) -> list[str]:
        """Share of each val target's top proponents that are of its class (chance: 50%)."""
        splits = json.loads(self.run.paths.splits.read_text())
        train_y, val_y = np.array(splits["train_labels"]), np.array(splits["val_labels"])
        lines = [f"| method | top-{top} proponents of the target's class (val) | "
                 f"top-{top} opponents of the target's class |", "|---|---|---|"]
        for method in self.run.cfg.attribution.methods:
            path = self.run.paths.scores(method, "val")
            if not path.exists():
                continue
            s = np.load(path)
            y = val_y[: s.shape[0]]
            order = np.argsort(-s, axis=1, kind="stable")
            pro = (train_y[order[:, :top]] == y[:, None]).mean()
            opp = (train_y[order[:, -top:]] == y[:, None]).mean()
            lines.append(f"| {method} | {100 * pro:.0f}% | {100 * opp:.0f}% |")
        return lines

    def diff(self, a: str, b: str, targets: str, selection: str = "heldout") -> dict:
        return compare(self.run, a, b, targets, selection)

    @staticmethod
    def verdict(d: dict, sign: int = 1) -> str:
        lo, hi = sign * d["ci_low"], sign * d["ci_high"]
        lo, hi = min(lo, hi), max(lo, hi)
        if lo > 0:
            return "holds"
        if hi < 0:
            return "reversed"
        return "not separated"

    def claim_rows(self, pairs, sign: int = 1) -> list[str]:
        lines = ["| comparison | targets | difference (points) [95% paired CI] | verdict |",
                 "|---|---|---|---|"]
        for a, b in pairs:
            for t in ("val", "gen"):
                try:
                    d = self.diff(a, b, t)
                except ValueError:
                    lines.append(f"| {a} − {b} | {t} | not evaluated in this run | — |")
                    continue
                lines.append(f"| {a} − {b} | {t} | {d['diff']:+.1f} [{d['ci_low']:+.1f}, "
                             f"{d['ci_high']:+.1f}] | {self.verdict(d, sign)} |")
        return lines

    def counterfactual(self) -> list[str]:
        path = self.run.paths.results / "counterfactual.json"
        if not path.exists():
            return ["(no counterfactual results in this run)"]
        cf = json.loads(path.read_text())
        recs = cf["records"]
        lines = ["| removal | targets | mean pixel L2 | median pixel L2 | per target |",
                 "|---|---|---|---|---|"]
        for method in cf["settings"]["methods"]:
            v = [(r["target"], r["pixel_l2"]) for r in recs if r["method"] == method]
            vals = np.array([x for _, x in v])
            per = ", ".join(f"#{t}: {x:.2f}" for t, x in v)
            lines.append(f"| {method} | {len(v)} | {vals.mean():.3f} | {np.median(vals):.3f} | "
                         f"{per} |")
        s = cf["settings"]
        lines.append("")
        lines.append(f"k = {s['k']} of {s['n_train']} training images removed per target; "
                     f"{s['sampler']} {s['sampling_steps']} steps with each target's own seed.")
        return lines

    def report(self) -> str:
        out = ["Settings: " + self.settings(), ""]
        for sel in ("heldout", "paper"):
            out += [f"### Output-function ablation, {sel} λ (paper's value in brackets)", ""]
            out += self.ablation(sel) + [""]
        for sel in ("heldout", "paper"):
            out += [f"### Main table, {sel} λ", ""] + self.main_table(sel) + [""]
        out += ["### Claim 1: D-TRAK's output functions beat TRAK's loss", ""]
        pairs = [(_at(OUTPUT_METHOD[o], k), _at("trak", k))
                 for k in (10, 100) for o in ("square", "avg", "l1", "l2")]
        pairs.append(("dtrak", "trak@100"))
        out += self.claim_rows(pairs) + [""]
        out += ["### Claim 2: elbo and linf are worse than loss at few timesteps", ""]
        out += self.claim_rows([("kernel-elbo", "trak"), ("kernel-linf", "trak")], sign=-1)
        out += [""]
        out += ["### Claim 3: more timesteps help (K = 100 minus K = 10)", ""]
        out += self.claim_rows([(_at(m, 100), m) for m in OUTPUT_METHOD.values()]) + [""]
        out += ["### λ chosen per output function", ""] + self.lambdas() + [""]
        out += ["### Sanity: do the top proponents share the target's class?", "",
                "Score matrices of the score stage (λ at its prior, before the LDS chose one).",
                ""] + self.class_agreement() + [""]
        out += ["### Counterfactual", ""] + self.counterfactual()
        return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/cifar2_tables.py RUN_DIR")
    print(Tables(sys.argv[1]).report())
