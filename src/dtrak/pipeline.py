"""The pipeline: which stages ``dtrak run`` executes, in which order, and the report stage.

Each stage is a plain function of a :class:`~dtrak.stages.run.Run` (a run directory and its
resolved config) and skips what is already done, so ``dtrak run`` can be interrupted and
started again. The stages live in :mod:`dtrak.stages`; this module, at the top of the
dependency order, adds the report and runs them in order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .report import write_report
from .stages.basic import generate_into, stage_data, stage_generate, stage_train
from .stages.counterfactual import stage_counterfactual
from .stages.featurize import feature_jobs, featurize_shard, stage_featurize
from .stages.lds import stage_lds
from .stages.run import RESULT_NEUTRAL_KEYS, Run, RunConfigError, open_run
from .stages.score import stage_score, write_scores

log = logging.getLogger(__name__)

__all__ = [
    "RESULT_NEUTRAL_KEYS",
    "STAGES",
    "Run",
    "RunConfigError",
    "feature_jobs",
    "featurize_shard",
    "generate_into",
    "open_run",
    "run_stages",
    "stage_counterfactual",
    "stage_data",
    "stage_featurize",
    "stage_generate",
    "stage_lds",
    "stage_report",
    "stage_score",
    "stage_train",
    "write_scores",
]


def stage_report(run: Run, out_dir: str | Path | None = None) -> dict:
    """Write RUN/report/index.html (or ``out_dir``/index.html) from the saved artefacts."""
    ds = run.dataset
    n = run.cfg.attribution.n_targets
    methods = [m for m in run.cfg.attribution.methods if run.paths.scores(m, "gen").exists()
               or run.paths.scores(m, "val").exists()]
    path = write_report(run.paths.root, train_images=ds.train.images.numpy(),
                        val_images=ds.val.images[:n].numpy(),
                        methods=methods or ("trak", "dtrak"), out_dir=out_dir)
    return {"report": str(path)}


STAGES: dict[str, Callable[[Run], dict]] = {
    "data": stage_data,
    "train": stage_train,
    "generate": stage_generate,
    "featurize": stage_featurize,
    "score": stage_score,
    "lds": stage_lds,
    "counterfactual": stage_counterfactual,
    "report": stage_report,
}


def run_stages(run: Run, stages: tuple[str, ...] | None = None,
               echo: Callable[[str], None] = log.info) -> dict[str, dict]:
    """Run the configured stages in order; each skips what is already done."""
    stages = stages or run.cfg.stages
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    results = {}
    for name in stages:
        echo(f"[{name}]")
        t0 = time.time()
        results[name] = STAGES[name](run)
        seconds = time.time() - t0
        echo(f"[{name}] done in {seconds:.1f} s: "
             f"{json.dumps(results[name], default=str)[:400]}")
        with open(run.paths.root / "timings.jsonl", "a") as f:  # one line per stage call
            f.write(json.dumps({"stage": name, "seconds": round(seconds, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    (run.paths.root / "stages.json").write_text(json.dumps(results, indent=2, default=str))
    return results
