"""DDPM training with the paper's recipe, on any subset of training indices, resumable.

Training is deterministic given (seed, indices): the batch order of epoch e comes from a
generator seeded with (seed, e), and the timesteps, noise and flips of step s from one
seeded with (noise_seed, s). Dropout draws from torch's global generator, whose state is
saved with every checkpoint. So a run killed and restarted from its last checkpoint ends
with the same weights as an uninterrupted one (a test proves it).

Layout of a model directory (see :mod:`dtrak.paths`)::

    MODEL/unet/                     final weights (diffusers format), written last
    MODEL/checkpoints/step-0000500/ unet/ + optimizer.safetensors + state.json
    MODEL/stats.jsonl               one line per logged step: step, loss, lr, seconds
    MODEL/done.json                 written when training finished
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import ModelConfig, TrainConfig
from .model import build_scheduler, build_unet, load_unet, save_unet
from .seeding import seed_from

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train_model", "total_steps", "latest_checkpoint", "is_trained"]


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
    save_file(tensors, str(path))
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


def _save_checkpoint(directory: Path, step: int, model, opt, sched, loss: float) -> Path:
    final = directory / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_unet(model, tmp / "unet")
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


def _step_randomness(step: int, noise_seed: int, shape, T: int, hflip: bool):
    g = torch.Generator().manual_seed(seed_from(noise_seed, "step", step))
    t = torch.randint(0, T, (shape[0],), generator=g)
    eps = torch.randn(shape, generator=g)
    flip = torch.rand(shape[0], generator=g) < 0.5 if hflip else None
    return t, eps, flip


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
) -> TrainResult:
    """Train a UNet on ``images[indices]`` ([N, C, H, W] in [-1, 1]) and save it.

    ``seed`` (default ``train_cfg.seed``) fixes batch order and dropout; ``init_seed`` and
    ``noise_seed`` default to it and fix the initial weights and the timestep/noise stream
    (common random numbers use one init_seed/noise_seed for many subsets). Resumes from
    the newest checkpoint in ``directory``; ``stop_at`` ends early after that step (the run
    then resumes later). Returns when ``done.json`` exists.
    """
    directory = Path(directory)
    seed = train_cfg.seed if seed is None else seed
    init_seed = seed if init_seed is None else init_seed
    noise_seed = seed if noise_seed is None else noise_seed
    data = images if indices is None else images[torch.as_tensor(np.asarray(indices))]
    n = data.shape[0]
    if n == 0:
        raise ValueError("train_model: no training examples (empty index list)")
    steps = total_steps(train_cfg, n)
    if is_trained(directory):
        info = json.loads((directory / "done.json").read_text())
        return TrainResult(directory, info["steps"], info["final_loss"], info["seconds"],
                           info["steps_per_second"])
    directory.mkdir(parents=True, exist_ok=True)

    accel = Accelerator(mixed_precision=train_cfg.mixed_precision,
                        cpu=not torch.cuda.is_available())
    model = build_unet(model_cfg, data.shape[1], data.shape[-1], seed=init_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr,
                            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                            weight_decay=train_cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(train_cfg.warmup_frac * steps), steps)
    start = 0
    torch.manual_seed(seed_from(seed, "dropout"))
    ckpt = latest_checkpoint(directory)
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        model = load_unet(ckpt / "unet")
        opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr,
                                betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                weight_decay=train_cfg.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(train_cfg.warmup_frac * steps), steps)
        # after the scheduler: its constructor resets the lr that the optimizer state restores
        _load_optimizer(opt, ckpt / "optimizer.safetensors", state["optimizer"])
        sched.load_state_dict({**state["lr_scheduler"], "lr_lambdas": [None]})
        torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
        start = state["step"]
        log.info("resuming %s from step %d", directory, start)
    model, opt, sched = accel.prepare(model, opt, sched)
    model.train()
    abar = build_scheduler(model_cfg).alphas_cumprod.to(accel.device)
    T = model_cfg.num_train_timesteps

    stats = open(directory / "stats.jsonl", "a")  # noqa: SIM115 - closed below
    t0, loss_val = time.time(), float("nan")
    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=steps, desc=desc, disable=not progress,
               leave=False)
    for step in bar:
        pos = _batch_indices(n, train_cfg.batch_size, seed, step)
        x0 = data[torch.as_tensor(pos)].to(accel.device)
        t, eps, flip = _step_randomness(step, noise_seed, x0.shape, T, train_cfg.hflip)
        t, eps = t.to(accel.device), eps.to(accel.device)
        if flip is not None:
            x0 = torch.where(flip.to(accel.device)[:, None, None, None], x0.flip(-1), x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with accel.autocast():
            pred = model(x_t, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        accel.backward(loss)
        if train_cfg.grad_clip > 0:
            accel.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss.item()
        done = step + 1
        if done % 10 == 0 or done == end:
            bar.set_postfix(loss=f"{loss_val:.4f}")
            stats.write(json.dumps({"step": done, "loss": loss_val,
                                    "lr": sched.get_last_lr()[0],
                                    "seconds": round(time.time() - t0, 3)}) + "\n")
        if done % train_cfg.checkpoint_every == 0 or done == end:
            stats.flush()
            _save_checkpoint(directory, done, accel.unwrap_model(model), opt, sched, loss_val)
            if on_checkpoint is not None:
                on_checkpoint(done)
    stats.close()
    seconds = time.time() - t0
    rate = (end - start) / seconds if seconds > 0 else float("nan")
    if end < steps:
        return TrainResult(directory, end, loss_val, seconds, rate)
    final = accel.unwrap_model(model)
    save_unet(final, directory / "unet")
    info = {"steps": steps, "final_loss": loss_val, "seconds": seconds,
            "steps_per_second": rate, "n_examples": n}
    (directory / "done.json").write_text(json.dumps(info, indent=2))
    log.info("trained %s: %d steps, %.2f steps/s, final loss %.4f", directory, steps, rate,
             loss_val)
    return TrainResult(directory, steps, loss_val, seconds, rate)
