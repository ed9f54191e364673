"""The featurize stage: features of the training set and every target set, per output and K.

``stage_featurize`` fills every store the configured methods read, all output functions of
one K together (one forward pass per batch). ``featurize_shard`` is one worker's part
(``dtrak featurize --shard i/N``), and :func:`feature_jobs` hands N such shards to the run's
executor (``dtrak featurize --shards N``): the workers fill disjoint rows of the same stores
(with ``attribution.store_shard_rows``, disjoint store shards: separate files per worker).
"""

from __future__ import annotations

from ..config import load_config
from ..farm import Job
from ..featurize import featurize_many
from ..methods import get_method
from ..paths import RunPaths
from .run import Run

__all__ = ["feature_jobs", "featurize_shard", "run_feature_shard", "stage_featurize"]


def stage_featurize(run: Run) -> dict:
    """Features of the training set and every target set, for each configured output."""
    ctx = run.context
    K = run.cfg.attribution.n_timesteps
    # (K, output) pairs: the configured outputs, then what each method needs at its own K
    wanted = [(K, o) for o in run.cfg.attribution.outputs]
    for name in run.cfg.attribution.methods:
        method = get_method(name)
        wanted += [(method.n_timesteps or K, o) for o in method.outputs]
    by_k: dict[int, list[str]] = {}
    for k, output in dict.fromkeys(wanted):
        by_k.setdefault(k, []).append(output)
    done = {}
    for k, outputs in by_k.items():
        kctx = ctx.at_timesteps(k)
        for set_name in ["train", *run.target_sets()]:
            # all output functions of one K together: one forward pass per batch
            for output, feats in kctx.prefetch(set_name, outputs).items():
                done[f"{set_name}/{kctx.spec(output).name}"] = list(feats.shape)
    for name in run.cfg.attribution.methods:  # features made otherwise (e.g. DAS's unit ones)
        method = get_method(name)
        if method.feature:
            mctx, spec = method.context(ctx), method.spec(ctx)
            for set_name in ["train", *run.target_sets()]:
                feats = mctx.features(set_name, method.output, spec=spec)
                done[f"{set_name}/{spec.name}"] = list(feats.shape)
    return done


def featurize_shard(run: Run, shard: tuple[int, int], sets: list[str] | None = None,
                    outputs: list[str] | None = None) -> dict:
    """One shard worker's part of the featurize stage (``dtrak featurize --shard i/N``)."""
    ctx = run.context
    sets = sets or ["train", *run.target_sets()]
    outputs = outputs or list(run.cfg.attribution.outputs)
    specs = {o: ctx.spec(o) for o in outputs}
    left = {}
    for set_name in sets:  # all outputs of a set in one pass, as the featurize stage does
        stores = featurize_many(
            ctx.adapter(), ctx.examples(set_name),
            {o: run.paths.features("full", set_name, sp.name) for o, sp in specs.items()},
            specs[outputs[0]], ctx.sched, "full", set_name, run.cfg.attribution.batch_size,
            progress=run.progress, shard=shard, gradients=run.cfg.attribution.gradients,
            shard_rows=run.cfg.attribution.store_shard_rows)
        for o, store in stores.items():
            left[f"{set_name}/{specs[o].name}"] = len(store.missing())
    return {"shard": f"{shard[0]}/{shard[1]}", "examples_left_in_store": left}


def run_feature_shard(payload: dict) -> dict:
    """The function of a featurization :class:`~dtrak.farm.Job` (what a worker runs)."""
    paths = RunPaths(payload["run"])
    run = Run(paths, load_config(paths.config), progress=False)
    return featurize_shard(run, tuple(payload["shard"]), payload["sets"], payload["outputs"])


def feature_jobs(run: Run, n_shards: int, sets: list[str] | None = None,
                 outputs: list[str] | None = None) -> list[Job]:
    """``n_shards`` jobs that together fill the feature stores of ``sets`` x ``outputs``."""
    if n_shards < 1:
        raise ValueError(f"the number of shards must be >= 1, got {n_shards}")
    sets = sets or ["train", *run.target_sets()]
    outputs = outputs or list(run.cfg.attribution.outputs)
    return [Job(f"features-{i}of{n_shards}", run_feature_shard,
                {"run": str(run.paths.root), "shard": [i, n_shards], "sets": sets,
                 "outputs": outputs})
            for i in range(n_shards)]
