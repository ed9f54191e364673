"""The command line: ``dtrak STAGE ...``, ``dtrak run CONFIG --out RUN``, ``dtrak demo``.

The only module that parses argv. Every command turns the library's errors into one clean
line on stderr and a non-zero exit.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
from pathlib import Path

import click
import torch
from diffusers import DDPMScheduler

from . import pipeline
from .config import PRESETS, ConfigError, load_config
from .data import load_dataset, load_image_folder, resize_images
from .families.sd_components import tiny_text_encoder, write_pipeline
from .figures import attribution_gallery
from .outputs import get_output
from .stages.attribute import attribute_images, attribution_spec
from .stages.attribute_text import attribute_lora_images
from .stages.lds import compare
from .store import parse_shard

log = logging.getLogger("dtrak")

_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, ConfigError)


def _os_error(e: OSError) -> str:
    """One line for a failure of the file system (a full disk, a denied permission)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"the disk is full{where}; free some space (or use a run directory on another "
                "disk) and run the command again: finished work is kept")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"permission denied{where}; the run directory must be writable (read-only "
                "runs: `dtrak report RUN --to DIR`, `dtrak compare`)")
    return f"{e.strerror or e}{where}"


def _friendly(fn):
    """Run a command; print library errors as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
        except OSError as e:
            click.echo(f"error: {_os_error(e)}", err=True)
            sys.exit(2)

    return wrapper


def _common(fn):
    """Options shared by every stage command."""
    opts = [
        click.option("--config", "-c", "config", default=None,
                     help=f"preset ({', '.join(PRESETS)}), TOML file or config.json; "
                          "default: the run's saved config"),
        click.option("--out", "-o", "out", type=click.Path(file_okay=False), default=None,
                     help="run directory"),
        click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="override a config value (repeatable)"),
        click.option("--overwrite", is_flag=True,
                     help="allow a changed config: recompute what the change affects"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bars"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _open(config, out, overrides, overwrite, quiet) -> pipeline.Run:
    if out is None:
        raise click.UsageError("--out RUN is required")
    saved = Path(out) / "config.json"
    if config is None and not saved.exists():
        raise ConfigError(
            f"{out} has no saved config; pass --config (a preset or a TOML file)"
        )
    cfg = load_config(config if config is not None else saved, list(overrides))
    return pipeline.open_run(out, cfg, overwrite=overwrite, progress=not quiet)


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group()
@click.option("--verbose", "-v", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """dtrak: data attribution for diffusion models (TRAK, D-TRAK, baselines, LDS)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # diffusers and accelerate are chatty at INFO
    for name in ("diffusers", "accelerate", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


@main.command("data")
@_common
@click.option("--root", default=None, help="shorthand for --set data.root=PATH")
@_friendly
def data_cmd(config, out, overrides, overwrite, quiet, root):
    """Resolve the data splits: sizes, class counts, preview grid (saved with --out)."""
    overrides = list(overrides) + ([f'data.root="{root}"'] if root else [])
    if out is None:
        cfg = load_config(config, overrides)
        _echo_json(load_dataset(cfg.data).summary())
        return
    run = _open(config, out, overrides, overwrite, quiet)
    _echo_json(pipeline.stage_data(run))
    click.echo(f"preview: {run.paths.data / 'preview.png'}")


def _stage_command(name: str, help_text: str):
    @_common
    @_friendly
    def cmd(config, out, overrides, overwrite, quiet):
        run = _open(config, out, overrides, overwrite, quiet)
        _echo_json(pipeline.STAGES[name](run))

    cmd.__doc__ = help_text
    return main.command(name)(cmd)


_stage_command("train", "Train the full model (resumes from its last checkpoint).")
_stage_command("generate", "Generate the sample set with per-image seeds (resumable).")


def _methods_override(methods: tuple[str, ...]) -> list[str]:
    if not methods:
        return []
    return ["attribution.methods=[" + ",".join(f'"{m}"' for m in methods) + "]"]


@main.command("featurize")
@_common
@click.option("--shard", default=None, metavar="i/N",
              help="compute only examples with id % N == i (run N workers at once)")
@click.option("--output", "outputs", multiple=True,
              help="output function(s) to featurize (default: the config's)")
@click.option("--targets", "sets", default=None,
              help="comma-separated sets: train, val, gen (default: train + the config's)")
@click.option("--shards", type=int, default=None, metavar="N",
              help="split the work into N shard jobs run by the run's executor "
                   "(runtime.executor, runtime.workers); with attribution.store_shard_rows "
                   "each job fills whole store shards, its own files")
@_friendly
def featurize_cmd(config, out, overrides, overwrite, quiet, shard, outputs, sets, shards):
    """Projected per-sample gradient features of the training and target sets."""
    run = _open(config, out, overrides, overwrite, quiet)
    chosen = [s.strip() for s in sets.split(",")] if sets else None
    if shards:
        jobs = pipeline.feature_jobs(run, shards, chosen, list(outputs) or None)
        run.executor().run(jobs, desc="feature shards")
        _echo_json(pipeline.featurize_shard(run, (0, 1), chosen, list(outputs) or None))
    elif shard or outputs or chosen:
        _echo_json(pipeline.featurize_shard(run, parse_shard(shard), chosen,
                                            list(outputs) or None))
    else:
        _echo_json(pipeline.stage_featurize(run))


@main.command("score")
@_common
@click.option("--method", "methods", multiple=True,
              help="method(s) to score (default: the config's attribution.methods)")
@_friendly
def score_cmd(config, out, overrides, overwrite, quiet, methods):
    """Score matrices [targets x training examples] under RUN/scores/."""
    run = _open(config, out, list(overrides) + _methods_override(methods), overwrite, quiet)
    _echo_json(pipeline.stage_score(run))


@main.command("lds")
@_common
@click.option("--method", "methods", multiple=True,
              help="method(s) to evaluate (default: the config's attribution.methods)")
@click.option("--workers", type=int, default=None,
              help="parallel training jobs (shorthand for --set runtime.workers=N)")
@_friendly
def lds_cmd(config, out, overrides, overwrite, quiet, methods, workers):
    """Train the subset models, measure ground truth, print the LDS table."""
    extra = _methods_override(methods) + ([f"runtime.workers={workers}"] if workers else [])
    run = _open(config, out, list(overrides) + extra, overwrite, quiet)
    res = pipeline.STAGES["lds"](run)
    click.echo("\n".join(res["table"]))
    click.echo(f"results: {run.paths.results / 'lds.json'}")


@main.command("compare")
@click.argument("method_a")
@click.argument("method_b")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="run directory with an LDS stage done")
@click.option("--targets", "sets", default="val,gen", show_default=True,
              help="comma-separated target sets")
@click.option("--selection", type=click.Choice(["heldout", "paper"]), default="heldout",
              show_default=True, help="lambda choice of methods that have one")
@_friendly
def compare_cmd(method_a, method_b, out, sets, selection):
    """LDS(A) - LDS(B) with a paired 95% bootstrap interval (same resampled subsets)."""
    run = pipeline.open_run(out, None, progress=False)
    for set_name in (s.strip() for s in sets.split(",")):
        r = compare(run, method_a, method_b, set_name, selection)
        click.echo(f"{set_name}: LDS({method_a}) - LDS({method_b}) = {r['diff']:+.2f} "
                   f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] points ({selection} lambda, "
                   f"{r['n_boot']} paired resamples, P(diff <= 0) = {r['p_le_0']:.3f})")


@main.command("counterfactual")
@_common
@click.option("--method", "methods", multiple=True,
              help="method(s) whose top proponents are removed (default: the config's)")
@click.option("--workers", type=int, default=None,
              help="parallel training jobs (shorthand for --set runtime.workers=N)")
@_friendly
def counterfactual_cmd(config, out, overrides, overwrite, quiet, methods, workers):
    """Remove each target's top-k proponents, retrain, regenerate, measure the change."""
    extra = ([f"counterfactual.methods=[{','.join(repr(m) for m in methods)}]"]
             if methods else []) + ([f"runtime.workers={workers}"] if workers else [])
    run = _open(config, out, list(overrides) + extra, overwrite, quiet)
    res = pipeline.STAGES["counterfactual"](run)
    click.echo("\n".join(res["table"]))
    click.echo(f"results: {res['results']}")


@main.command("attribute")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True),
              help="a diffusers pipeline folder (model_index.json, unet/, scheduler/) or a "
                   "model folder (config.json + safetensors) with --scheduler")
@click.option("--scheduler", default=None, type=click.Path(exists=True, file_okay=False),
              help="the model's noise schedule: a diffusers scheduler folder "
                   "(scheduler_config.json)")
@click.option("--run", "run_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="a dtrak run: its model, schedule, training images, LDS lambda")
@click.option("--data", default=None, type=click.Path(exists=True),
              help="folder of the model's training images (class folders for a "
                   "class-conditional model; default with --run: the run's)")
@click.option("--target-class", default=None,
              help="class of the targets (class-conditional models; default: their folder)")
@click.option("--output", "output_fn", default="square", show_default=True,
              help="output function: square (D-TRAK), loss (TRAK), avg, l1, l2, ...")
@click.option("--timesteps", "n_timesteps", type=int, default=None,
              help="K (default 10, or the run's)")
@click.option("--proj-dim", type=int, default=None,
              help="projection dimension k (default 2048, or the run's)")
@click.option("--projector", default=None, help="default gaussian, or the run's")
@click.option("--top", "k", default=8, show_default=True, help="proponents/opponents shown")
@click.option("--out", "out_dir", default="attribution", show_default=True,
              type=click.Path(file_okay=False), help="where the gallery PNGs go")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="training-feature cache (default ~/.cache/dtrak/attribute)")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N")
@click.option("--stream", is_flag=True,
              help="score by one pass over the training features on disk (memory "
                   "O(k^2 + block) whatever the training set's size; the kernel is "
                   "factorised once and cached)")
@click.option("--lora", "lora_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="a LoRA fine-tune of the Stable Diffusion folder --model "
                   "(pytorch_lora_weights.safetensors); features are its LoRA gradients")
@click.option("--prompt", default=None,
              help="with --lora: the prompt the targets were generated from")
@click.option("--caption-template", default=None,
              help="with --lora: caption of a class-folder training image without a "
                   "metadata.jsonl, e.g. 'a {class} painting'")
@click.option("--quiet", "-q", is_flag=True)
@_friendly
def attribute_cmd(images, model_dir, scheduler, run_dir, data, target_class, output_fn,
                  n_timesteps, proj_dim, projector, k, out_dir, cache_dir, device, stream,
                  lora_dir, prompt, caption_template, quiet):
    """Which training images made IMAGE? Top proponents and opponents, printed and as PNG."""
    get_output(output_fn)
    spec = attribution_spec(output_fn, n_timesteps, proj_dim, projector, run=run_dir)
    if lora_dir is not None:
        if model_dir is None or data is None or prompt is None:
            raise click.UsageError("--lora needs --model SD_DIR (the base), --data (the "
                                   "LoRA's training images) and --prompt (the targets')")
        results = attribute_lora_images(model_dir, lora_dir, data, list(images), prompt,
                                        spec, caption_template, cache_dir=cache_dir,
                                        progress=not quiet, device=device)
    else:
        results = attribute_images(model_dir, data, list(images), spec, cache_dir=cache_dir,
                                   progress=not quiet, device=device, scheduler=scheduler,
                                   run=run_dir, target_class=target_class, stream=stream)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = results[0]
    click.echo(f"model: {first.source}")
    click.echo(f"features: {spec.name}, {len(first.train_paths)} training images; "
               f"lambda = {first.lam_rel:.3g} x trace/N ({first.lam_from})")
    for i, res in enumerate(results):
        label = f" (class {res.target_class})" if res.target_class is not None else ""
        click.echo(f"\n{res.target}{label}")
        for label, rows in (("proponents", res.top(k)), ("opponents", res.top(k, True))):
            click.echo(f"  top {label}:")
            for idx, score, path in rows:
                click.echo(f"    {score:+.4e}  #{idx:<6d} {path}")
        train = res.train_images.numpy()
        target = load_image_folder([str(res.target)])[0][0].numpy()
        if target.shape != train.shape[1:]:
            target = resize_images(torch.from_numpy(target[None]), train.shape[-1])[0].numpy()
        png = attribution_gallery(target, train, {output_fn: res.scores},
                                  out / f"{i:03d}-{res.target.stem}.png", k=k,
                                  title=str(res.target))
        click.echo(f"  gallery: {png}")


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--to", "to", type=click.Path(file_okay=False), default=None,
              help="write the page here instead of RUN/report (the run is only read)")
@click.option("--quiet", "-q", is_flag=True)
@_friendly
def report_cmd(run_dir, to, quiet):
    """Write RUN/report/index.html (self-contained, offline) from saved results."""
    run = pipeline.open_run(run_dir, None, progress=not quiet)
    click.echo(pipeline.stage_report(run, to)["report"])


@main.command("run")
@click.argument("config")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="run directory")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--stages", default=None, help="comma-separated stages (default: the config's)")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
@_friendly
def run_cmd(config, out, overrides, stages, overwrite, quiet):
    """Run every configured stage in order, skipping what is done."""
    run = _open(config, out, overrides, overwrite, quiet)
    chosen = tuple(s.strip() for s in stages.split(",")) if stages else None
    _run_and_tell(run, chosen)


def _run_and_tell(run: pipeline.Run, stages) -> None:
    results = pipeline.run_stages(run, stages, echo=click.echo)
    if "lds" in results:
        click.echo("\n".join(results["lds"]["table"]))
    click.echo(f"run directory: {run.paths.root}")
    if "report" in results:
        click.echo(f"report: {results['report']['report']}")


@main.command("text-base")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="seed of the text encoder")
@_friendly
def text_base_cmd(out, seed):
    """Write a text-only base folder for a text UNet trained from scratch: a small random
    CLIP text encoder, a character-level tokenizer and a linear DDPM schedule (sd-lora with
    model.lora_rank = 0 and model.pretrained = OUT)."""
    path = write_pipeline(out, text_encoder=tiny_text_encoder(seed=seed),
                          scheduler=DDPMScheduler())
    click.echo(f"text encoder, tokenizer and scheduler written to {path}")


@main.command("demo")
@click.option("--out", "-o", default="demo-run", type=click.Path(file_okay=False),
              help="run directory (default: demo-run)")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
@_friendly
def demo_cmd(out, overrides, overwrite, quiet):
    """The whole pipeline on scikit-learn's digits (no download needed)."""
    run = _open("digits", out, overrides, overwrite, quiet)
    _run_and_tell(run, None)


if __name__ == "__main__":
    main()
