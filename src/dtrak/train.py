"""DDPM training with the paper's recipe, on any subset of training indices, resumable.

Training is deterministic given (seed, indices): the batch order of epoch e comes from a
generator seeded with (seed, e), and the timesteps, noise and flips of step s from one
seeded with (noise_seed, s). Dropout draws from torch's global generator, whose state is
saved with every checkpoint. So a run killed and restarted from its last checkpoint ends
with the same weights as an uninterrupted one (a test proves it).

The model comes from its family (:mod:`dtrak.families`, ``model.family``): the family builds,
saves and loads it, names the parameters to optimise and gives the loss of a batch, so
this loop serves every kind of model. ``device`` places it (``runtime.device``); the seeded
draws stay on the CPU generator, so a run means the same on every device.

Layout of a model directory (see :mod:`dtrak.paths`)::

    MODEL/unet/                     final weights (diffusers format), written last
    MODEL/checkpoints/step-0000500/ unet/ + optimizer.safetensors + state.json
    MODEL/stats.jsonl               one line per logged step: step, loss, lr, seconds
    MODEL/done.json                 written when training finished

A run whose loss (or, at a checkpoint, whose weights) stops being finite raises
:class:`TrainingDivergedError`: it writes neither that checkpoint, nor the final weights,
nor ``done.json``, so the checkpoints on disk are the last good ones.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .artefacts import DamagedArtefactError, as_os_error
from .config import ConfigError, ModelConfig, TrainConfig
from .families import ModelFamily, get_family
from .seeding import seed_from

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingDivergedError", "check_trainable", "train_model",
           "total_steps", "latest_checkpoint", "is_trained"]


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN/inf; the run is left unfinished."""


@dataclass(frozen=True)
class TrainResult:
    directory: Path
    steps: int
    final_loss: float
    seconds: float
    steps_per_second: float


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    """Optimizer steps of a run: ``cfg.steps`` or epochs x ceil(N / batch)."""
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * math.ceil(n_examples / cfg.batch_size)


def is_trained(directory: str | Path) -> bool:
    return (Path(directory) / "done.json").exists()


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = sorted((Path(directory) / "checkpoints").glob("step-*"))
    ckpts = [c for c in ckpts if (c / "state.json").exists()]
    return ckpts[-1] if ckpts else None


# ----------------------------------------------------------------------------- state I/O
# accelerate's save_state pickles the optimizer; we keep every artefact in open formats,
# so the AdamW state is flattened into safetensors and its scalars into JSON by hand.


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val) and val.ndim > 0:
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = float(val)
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:  # a full disk: raised as the OSError it is
        raise as_os_error(e, path) from e
    return {"scalars": scalars, "param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict) -> None:
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(val, dtype=torch.float32)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _diverged(what: str, step: int, directory: Path) -> TrainingDivergedError:
    ckpt = latest_checkpoint(directory)
    kept = f"last good checkpoint: {ckpt.name}" if ckpt else "no checkpoint was saved"
    return TrainingDivergedError(
        f"training diverged at step {step}: {what} in {directory} ({kept}; not marked done). "
        "Lower train.lr, check the data for NaN/inf values, and "
        "train again in a fresh directory.")


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _save_checkpoint(directory: Path, step: int, family: ModelFamily, model, opt, sched,
                     loss: float) -> Path:
    final = directory / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    family.save(model, tmp / "unet")
    opt_meta = _save_optimizer(opt, tmp / "optimizer.safetensors")
    rng = torch.get_rng_state().numpy().tolist()
    state = {"step": step, "loss": loss, "optimizer": opt_meta,
             "lr_scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
             "torch_rng_state": rng}
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic: a kill leaves either the old or the new checkpoint
    return final


# ----------------------------------------------------------------------------- the loop


def _batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Positions (0..n-1) of the examples of ``step``: epoch-wise seeded permutations."""
    per_epoch = math.ceil(n / batch)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng(seed_from(seed, "epoch", epoch)).permutation(n)
    return perm[pos * batch:(pos + 1) * batch]


def _step_randomness(step: int, noise_seed: int, batch: int, noise_shape, T: int, hflip: bool):
    g = torch.Generator().manual_seed(seed_from(noise_seed, "step", step))
    t = torch.randint(0, T, (batch,), generator=g)
    eps = torch.randn((batch, *noise_shape), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5 if hflip else None
    return t, eps, flip


def _flip(images: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    if flip is None:
        return images
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def _training_batch(data, pos: np.ndarray, flip: torch.Tensor | None, device):
    """The examples at ``pos`` on ``device``, images flipped where ``flip`` says: a tensor
    of images, or a dict with ``images`` (and the rest, e.g. captions, as it is); a dict of
    already-encoded examples (no ``images``) gets the flips as ``flip`` for the family's
    ``training_inputs`` to apply."""
    batch = data[torch.as_tensor(pos)]
    if isinstance(batch, dict) and "images" not in batch:
        return {**batch, "flip": flip}  # already-encoded examples: the family mirrors them
    if isinstance(batch, dict):
        return {**batch, "images": _flip(batch["images"].to(device), flip)}
    return _flip(batch.to(device), flip)


def _take(data, indices: np.ndarray):
    """The examples at ``indices``: a tensor's rows or an example set's ``select``."""
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(np.asarray(indices))]
    return data.select(np.asarray(indices))


@dataclass
class _Session:
    """What the loop updates: the model, its optimiser and schedule, and where it stands."""

    family: ModelFamily
    accel: Accelerator
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    start: int = 0


def _optimiser(family: ModelFamily, model, cfg: TrainConfig, steps: int):
    opt = torch.optim.AdamW(family.trainable_parameters(model), lr=cfg.lr,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, int(cfg.warmup_frac * steps), steps)


def _accelerator(cfg: TrainConfig, device: str | torch.device) -> Accelerator:
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    precision = cfg.mixed_precision
    if precision == "fp16" and device.type != "cuda":  # fp16 where the device allows it
        log.info("train.mixed_precision = fp16 needs a GPU; training in float32 on %s", device)
        precision = "no"
    return Accelerator(mixed_precision=precision, cpu=device.type != "cuda")


def _setup(family: ModelFamily, model_cfg: ModelConfig, cfg: TrainConfig, example_shape,
           steps: int, init_seed: int, seed: int, device) -> _Session:
    """A fresh model (seeded initialisation), AdamW and the warm-up cosine schedule."""
    model = family.build(model_cfg, example_shape, seed=init_seed)
    opt, sched = _optimiser(family, model, cfg, steps)
    torch.manual_seed(seed_from(seed, "dropout"))
    return _Session(family, _accelerator(cfg, device), model, opt, sched)


def _resume(session: _Session, directory: Path, cfg: TrainConfig, steps: int) -> None:
    """Continue from the newest checkpoint: weights, optimiser, schedule and RNG state."""
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        return
    try:
        state = json.loads((ckpt / "state.json").read_text())
        session.model = session.family.load(ckpt / "unet")
        session.opt, session.sched = _optimiser(session.family, session.model, cfg, steps)
        # after the scheduler: its constructor resets the lr that the optimizer state restores
        _load_optimizer(session.opt, ckpt / "optimizer.safetensors", state["optimizer"])
        session.sched.load_state_dict({**state["lr_scheduler"], "lr_lambdas": [None]})
        torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise DamagedArtefactError(
            f"checkpoint {ckpt} is damaged ({str(e).strip()[:200]}); delete that folder and "
            "train again: it resumes from the checkpoint before it") from e
    session.start = state["step"]
    log.info("resuming %s from step %d", directory, session.start)


def _loop(session: _Session, data: torch.Tensor, model_cfg: ModelConfig, cfg: TrainConfig,
          directory: Path, seed: int, noise_seed: int, steps: int, end: int, bar,
          on_checkpoint: Callable[[int], None] | None) -> float:
    """Steps ``session.start .. end``; logs every 10 steps, checkpoints every N. Final loss."""
    accel, family = session.accel, session.family
    model, opt, sched = accel.prepare(session.model, session.opt, session.sched)
    model.train()
    adapter = family.adapter(model)
    abar = family.scheduler(model_cfg).alphas_cumprod.to(accel.device)
    noise_shape = family.model_noise_shape(session.model, data.shape[1:])
    n, T = len(data), model_cfg.num_train_timesteps
    t0, loss_val = time.time(), float("nan")
    with open(directory / "stats.jsonl", "a") as stats:
        for step in bar:
            pos = _batch_indices(n, cfg.batch_size, seed, step)
            t, eps, flip = _step_randomness(step, noise_seed, len(pos), noise_shape, T, cfg.hflip)
            t, eps = t.to(accel.device), eps.to(accel.device)
            batch = _training_batch(data, pos, flip, accel.device)
            # the family's own draws (e.g. latents from a VAE posterior, dropped captions)
            g = torch.Generator().manual_seed(seed_from(noise_seed, "inputs", step))
            x0, cond = family.training_inputs(adapter, batch, model_cfg, g)
            with accel.autocast():
                loss = family.training_loss(adapter, x0, cond, t, eps, abar)
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise _diverged(f"loss is {loss_val}", step + 1, directory)
            accel.backward(loss)
            if cfg.grad_clip > 0:
                accel.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            if done % 10 == 0 or done == end:
                bar.set_postfix(loss=f"{loss_val:.4f}")
                stats.write(json.dumps({"step": done, "loss": loss_val,
                                        "lr": sched.get_last_lr()[0],
                                        "seconds": round(time.time() - t0, 3)}) + "\n")
            if done % cfg.checkpoint_every == 0 or done == end:
                stats.flush()
                if not _finite(model):  # a finite loss can still leave NaN weights
                    raise _diverged("the weights are not finite", done, directory)
                _save_checkpoint(directory, done, family, accel.unwrap_model(model), opt, sched,
                                 loss_val)
                if on_checkpoint is not None:
                    on_checkpoint(done)
    session.model = accel.unwrap_model(model)
    return loss_val


def _finish(session: _Session, directory: Path, steps: int, n: int, loss_val: float,
            seconds: float, rate: float) -> TrainResult:
    """Write the final weights, then ``done.json`` (last: its presence means finished)."""
    session.family.save(session.model, directory / "unet")
    info = {"steps": steps, "final_loss": loss_val, "seconds": seconds,
            "steps_per_second": rate, "n_examples": n}
    (directory / "done.json").write_text(json.dumps(info, indent=2))
    log.info("trained %s: %d steps, %.2f steps/s, final loss %.4f", directory, steps, rate,
             loss_val)
    return TrainResult(directory, steps, loss_val, seconds, rate)


def _finished(directory: Path) -> TrainResult:
    info = json.loads((directory / "done.json").read_text())
    return TrainResult(directory, info["steps"], info["final_loss"], info["seconds"],
                       info["steps_per_second"])


def _final_weights_present(directory: Path, family: ModelFamily, steps: int) -> bool:
    """Whether a finished run still has its final weights. Deleted ones are written again
    from the last checkpoint (which holds them); without it ``done.json`` is withdrawn, so
    training resumes rather than a later stage failing on a model that is not there."""
    weights = directory / "unet"
    if weights.is_dir() and any(weights.iterdir()):
        return True
    ckpt = latest_checkpoint(directory)
    if ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] == steps:
        log.warning("%s: final weights missing; restored from %s", directory, ckpt.name)
        family.save(family.load(ckpt / "unet"), weights)
        return True
    log.warning("%s: final weights missing and no final checkpoint; training again", directory)
    (directory / "done.json").unlink()
    return False


def check_trainable(model_cfg: ModelConfig) -> None:
    """Refuse what dtrak cannot train: it trains epsilon-prediction models only."""
    if model_cfg.prediction_type != "epsilon":
        raise ConfigError(
            f"model.prediction_type = {model_cfg.prediction_type!r}: dtrak trains "
            "epsilon-prediction models only (L_Simple); set model.prediction_type = "
            "\"epsilon\", or attribute your trained model with `dtrak attribute`")


def train_model(
    images: torch.Tensor,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    directory: str | Path,
    indices: np.ndarray | None = None,
    seed: int | None = None,
    init_seed: int | None = None,
    noise_seed: int | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    desc: str = "train",
    on_checkpoint: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a model of ``model_cfg.family`` on ``images[indices]`` and save it.

    ``images`` are the raw examples ([N, C, H, W] in [-1, 1], or an example set such as
    :class:`~dtrak.families.CaptionedImages` with ``select`` and ``shape``). ``seed`` (default
    ``train_cfg.seed``) fixes batch order and dropout; ``init_seed`` and ``noise_seed``
    default to it and fix the initial weights and the timestep/noise stream (common random
    numbers use one init_seed/noise_seed for many subsets). Resumes from the newest
    checkpoint in ``directory``; ``stop_at`` ends early after that step (the run then resumes
    later). Returns when ``done.json`` exists.
    """
    check_trainable(model_cfg)
    directory = Path(directory)
    seed = train_cfg.seed if seed is None else seed
    init_seed = seed if init_seed is None else init_seed
    noise_seed = seed if noise_seed is None else noise_seed
    data = images if indices is None else _take(images, indices)
    n = len(data)
    if n == 0:
        raise ValueError("train_model: no training examples (empty index list)")
    steps = total_steps(train_cfg, n)
    family = get_family(model_cfg.family)
    if is_trained(directory) and _final_weights_present(directory, family, steps):
        return _finished(directory)
    directory.mkdir(parents=True, exist_ok=True)
    session = _setup(family, model_cfg, train_cfg, data.shape[1:], steps, init_seed, seed, device)
    _resume(session, directory, train_cfg, steps)
    start = session.start
    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=steps, desc=desc, disable=not progress,
               leave=False)
    t0 = time.time()
    loss_val = _loop(session, data, model_cfg, train_cfg, directory, seed, noise_seed, steps,
                     end, bar, on_checkpoint)
    seconds = time.time() - t0
    rate = (end - start) / seconds if seconds > 0 else float("nan")
    if end < steps:
        return TrainResult(directory, end, loss_val, seconds, rate)
    return _finish(session, directory, steps, n, loss_val, seconds, rate)
