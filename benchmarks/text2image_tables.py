"""Tables of the CPU-scale text-to-image benchmark (LoRA fine-tunes), in markdown.

    python benchmarks/text2image_tables.py bench-runs/cifar2-lora [bench-runs/cifar8-text-base]

Reads a finished run of ``configs/cifar2-lora-bench.toml`` and prints its settings, the
output-function ablation at K = 10 with 95% intervals (the paper's ArtBench-2 values where it
reports one), the baselines, the claims decided by paired bootstrap intervals of the LDS
difference (:func:`dtrak.stages.lds.compare`; the rule of ``cifar2_tables.py``: "holds" when
the interval lies on the claimed side of 0, "reversed" on the other, "not separated" when
it contains 0), the λ chosen per kernel, and the stage times of both runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cifar2_tables import OUTPUT_METHOD, Tables

# paper, ArtBench-2 (Stable Diffusion + LoRA), validation LDS at K = 10 (SPEC section 6)
PAPER_ARTBENCH = {"trak": "12.4", "dtrak": "27.9"}
BASELINES = ("random", "pixel-dot", "pixel-cos", "grad-cos")


class TextTables(Tables):
    def settings(self) -> str:
        s, cfg = self.lds["settings"], self.run.cfg
        m, a = cfg.model, cfg.attribution
        return (f"{cfg.data.train_size} train / {cfg.data.val_size} val images ({cfg.data.name}, "
                f"{cfg.data.resolution}×{cfg.data.resolution}, pixel space), captions "
                f"\"{m.caption_template}\" ({m.caption_dropout:.0%} dropped in training); LoRA "
                f"rank {m.lora_rank} (alpha {m.lora_alpha:g}) on {', '.join(m.lora_targets)} of "
                f"the base {m.pretrained}; {cfg.train.epochs} epochs, batch "
                f"{cfg.train.batch_size}, lr {cfg.train.lr:g}; M = {s['n_subsets']} LoRA subset "
                f"models (α = {s['alpha']}), seeds {s['seeds']}, ground truth over "
                f"{s['eval_timesteps']} timesteps; {a.n_targets} targets per set; K = "
                f"{a.n_timesteps}, k = {a.proj_dim} ({a.projector}); 95% percentile bootstrap "
                f"over subsets ({s['n_boot']} resamples)")

    def ablation_k10(self) -> list[str]:
        lines = ["| output f | method | val LDS % (held-out λ) | gen LDS % (held-out λ) | "
                 "val (paper λ) | gen (paper λ) | paper ArtBench-2 val |",
                 "|---|---|---|---|---|---|---|"]
        rows = [*OUTPUT_METHOD.items(), *(("—", m) for m in BASELINES)]
        for out, method in rows:
            cells = [self.cell(method, t, sel) for sel in ("heldout", "paper")
                     for t in ("val", "gen")]
            lines.append(f"| {out} | {method} | " + " | ".join(cells) + " | "
                         f"{PAPER_ARTBENCH.get(method, '—')} |")
        return lines

    def report(self) -> str:
        out = ["Settings: " + self.settings(), ""]
        out += ["### LDS (%) at K = 10, 95% intervals", ""] + self.ablation_k10() + [""]
        out += ["### Claim 1: D-TRAK's output functions beat TRAK's loss (held-out λ)", ""]
        out += self.claim_rows([(OUTPUT_METHOD[o], "trak")
                                for o in ("square", "avg", "l1", "l2")]) + [""]
        out += ["### Claim 2: elbo and linf are worse than loss at few timesteps", ""]
        out += self.claim_rows([("kernel-elbo", "trak"), ("kernel-linf", "trak")], sign=-1)
        out += ["", "### Attribution against the raw-pixel baseline", ""]
        out += self.claim_rows([("dtrak", "pixel-cos"), ("trak", "pixel-cos")]) + [""]
        out += ["### λ chosen per output function", ""] + self.lambdas(ks=(10,)) + [""]
        out += ["### Sanity: do the top proponents share the target's class?", "",
                "Score matrices of the score stage (λ at its prior, before the LDS chose one).",
                ""] + self.class_agreement() + [""]
        return "\n".join(out)


def stage_times(run_dir: Path) -> str:
    """Minutes per stage from RUN/timings.jsonl (summed over resumed calls)."""
    path = run_dir / "timings.jsonl"
    if not path.is_file():
        return f"({run_dir}: no timings.jsonl)"
    total: dict[str, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        total[rec["stage"]] = total.get(rec["stage"], 0.0) + rec["seconds"]
    cells = ", ".join(f"{name} {sec / 60:.1f}" for name, sec in total.items())
    return f"{run_dir.name}: {cells} (minutes; all {sum(total.values()) / 60:.1f})"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or not all(Path(a).is_dir() for a in sys.argv[1:]):
        sys.exit("usage: python benchmarks/text2image_tables.py LORA_RUN [BASE_RUN]")
    print(TextTables(sys.argv[1]).report())
    print("### Stage times\n")
    for run in sys.argv[1:][::-1]:
        print("- " + stage_times(Path(run)))
