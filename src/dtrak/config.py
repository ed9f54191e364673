"""Configuration: frozen dataclasses with help text and validation, presets, TOML/JSON I/O.

A run is described by one :class:`Config`. Every stage reads the section it needs; the
resolved config is saved as ``RUN/config.json`` and a stage asked to write into a run made
with a different config refuses (see :func:`diff_configs`) unless told to overwrite.

User configs are TOML files whose tables mirror the sections::

    preset = "digits"          # optional: start from a preset, then override
    [data]
    name = "digits"
    [train]
    steps = 2000

Overrides from the command line use dotted keys: ``--set train.steps=500``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "AttributionConfig",
    "Config",
    "ConfigError",
    "CounterfactualConfig",
    "DASConfig",
    "InfluenceConfig",
    "DataConfig",
    "LDSConfig",
    "ModelConfig",
    "SamplingConfig",
    "TrainConfig",
    "RuntimeConfig",
    "PRESETS",
    "apply_overrides",
    "diff_configs",
    "from_dict",
    "load_config",
    "preset",
    "save_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field carrying its help text in the metadata."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    name: str = _help("data set: digits, cifar10, cifar2, celeba, artbench, imagefolder", "digits")
    root: str | None = _help(
        "path to the data (image-folder tree, cifar-10-python.tar.gz, CelebA folder); "
        "not needed for digits",
        None,
    )
    resolution: int | None = _help("resize images to this side length (None: native)", None)
    classes: tuple[str, ...] | None = _help(
        "restrict to these class names (cifar2 = automobile, horse)", None
    )
    train_size: int | None = _help(
        "stratified training subset size (random_state = split_seed); None: all", None
    )
    val_size: int | None = _help(
        "stratified validation subset size drawn from the held-out split; None: all", None
    )
    split_seed: int = _help("random_state of the stratified splits (paper: 42)", 42)
    download: bool = _help("download CIFAR-10 (checksum verified) if not found at root", False)
    cache_dir: str | None = _help("where downloads are kept (default ~/.cache/dtrak)", None)

    def validate(self) -> None:
        _check(bool(self.name), "data.name", "must name a data set")
        if self.resolution is not None:
            _check(self.resolution >= 4, "data.resolution", "must be at least 4 pixels")
        for key in ("train_size", "val_size"):
            v = getattr(self, key)
            if v is not None:
                _check(v >= 2, f"data.{key}", "must be at least 2 (or omitted for all)")


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class ModelConfig:
    family: str = _help(
        "model family (dtrak.families): unet2d (pixel-space diffusers UNet2DModel)", "unet2d"
    )
    preset: str = _help(
        "UNet preset: tiny, digits, cifar-cpu, cifar (paper, ~36M), celeba (paper, ~114M)",
        "digits",
    )
    block_out_channels: tuple[int, ...] | None = _help("override the preset's channels", None)
    layers_per_block: int | None = _help("override the preset's layers per block", None)
    attention_levels: tuple[int, ...] | None = _help(
        "override which resolution levels (0 = highest) carry self-attention", None
    )
    dropout: float = _help("dropout in the ResNet blocks (paper: 0.1)", 0.1)
    num_train_timesteps: int = _help("diffusion steps T (paper: 1000)", 1000)
    beta_start: float = _help("first beta of the linear schedule", 1e-4)
    beta_end: float = _help("last beta of the linear schedule", 0.02)
    beta_schedule: str = _help(
        "noise schedule: linear (paper), scaled_linear, squaredcos_cap_v2 (cosine; "
        "beta_start/beta_end unused)", "linear"
    )
    prediction_type: str = _help(
        "what the model predicts: epsilon (the only one dtrak trains), v_prediction or "
        "sample (attributed through their epsilon prediction)", "epsilon"
    )
    pretrained: str | None = _help(
        "sd-lora: a local Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/ as StableDiffusionPipeline.save_pretrained writes it); never downloaded. "
        "Without unet/ (and lora_rank = 0) the UNet is built from model.preset", None)
    lora_rank: int | None = _help(
        "sd-lora: LoRA rank r (paper: 128); 0 or None trains the whole UNet", 128)
    lora_alpha: float | None = _help("sd-lora: LoRA alpha (None: = rank, as the paper)", None)
    lora_targets: tuple[str, ...] = _help(
        "sd-lora: the attention layers that get a LoRA adapter",
        ("to_q", "to_k", "to_v", "to_out.0"))
    lora_init: str = _help("sd-lora: LoRA initialisation (peft init_lora_weights)", "gaussian")
    caption_template: str = _help(
        "sd-lora: caption of a class-folder image, {class} = the folder name with underscores "
        "as spaces (artbench: 'a {class} painting')", "a photo of a {class}")
    caption_dropout: float = _help(
        "sd-lora: fraction of training captions replaced by the empty prompt (paper: 0.1)", 0.1)

    def validate(self) -> None:
        _check(bool(self.family), "model.family", "must name a model family, e.g. unet2d")
        _check(self.lora_rank is None or self.lora_rank >= 0, "model.lora_rank",
               "must be >= 0 (0: train the whole UNet)")
        _check(0.0 <= self.caption_dropout < 1.0, "model.caption_dropout", "must be in [0, 1)")
        _check("{class}" in self.caption_template, "model.caption_template",
               "must contain {class}, e.g. 'a photo of a {class}'")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.num_train_timesteps >= 2, "model.num_train_timesteps", "must be >= 2")
        _check(0 < self.beta_start < self.beta_end < 1, "model.beta_start/beta_end",
               "need 0 < beta_start < beta_end < 1")
        _check(self.beta_schedule in BETA_SCHEDULES, "model.beta_schedule",
               f"must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        _check(self.prediction_type in PREDICTION_TYPES, "model.prediction_type",
               f"must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = _help("optimizer steps; None: derive from epochs", None)
    epochs: int = _help("epochs when steps is None (paper: 200)", 200)
    batch_size: int = _help("batch size (paper: 128)", 128)
    lr: float = _help("AdamW learning rate (paper: 1e-4)", 1e-4)
    adam_beta1: float = _help("AdamW beta1 (paper: 0.95)", 0.95)
    adam_beta2: float = _help("AdamW beta2 (paper: 0.999)", 0.999)
    weight_decay: float = _help("AdamW weight decay (paper: 1e-6)", 1e-6)
    warmup_frac: float = _help("linear warmup as a fraction of all steps (paper: 0.1)", 0.1)
    grad_clip: float = _help("gradient-norm clip (paper: 1.0)", 1.0)
    hflip: bool = _help("random horizontal flip (paper: yes; off for digits)", True)
    seed: int = _help("training seed of the full model (paper: 42)", 42)
    checkpoint_every: int = _help("save a checkpoint every N steps (kept, for TracIn)", 500)
    mixed_precision: str = _help("accelerate mixed precision: no, fp16, bf16 (paper: no)", "no")
    common_init: bool = _help(
        "common random numbers: every subset model starts from the same initialisation and "
        "draws the same timestep/noise stream (raises the seed-to-seed ceiling)",
        False,
    )

    def validate(self) -> None:
        if self.steps is not None:
            _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 <= self.warmup_frac < 1, "train.warmup_frac", "must be in [0, 1)")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision",
               "must be one of no, fp16, bf16")


@dataclass(frozen=True)
class SamplingConfig:
    n_images: int = _help("number of generated images (paper: 1000)", 1000)
    sampler: str = _help("ddim or ddpm", "ddim")
    steps: int = _help("sampling steps (paper: DDIM 50)", 50)
    eta: float = _help("DDIM eta (paper: 0)", 0.0)
    gen_seed: int = _help("image i is seeded with 1000 * gen_seed + i", 0)
    batch_size: int = _help("images per batch (results do not depend on it)", 64)
    save_trajectory: bool = _help(
        "keep the predicted clean image at every step (needed by Journey TRAK)", True
    )
    guidance_scale: float = _help(
        "classifier-free guidance of text-conditioned models (diffusers' default 7.5; 1: none)",
        7.5)

    def validate(self) -> None:
        _check(self.n_images >= 1, "sampling.n_images", "must be >= 1")
        _check(self.sampler in ("ddim", "ddpm"), "sampling.sampler", "must be ddim or ddpm")
        _check(self.steps >= 1, "sampling.steps", "must be >= 1")
        _check(self.batch_size >= 1, "sampling.batch_size", "must be >= 1")


PROJECTORS = ("gaussian", "rademacher", "srht", "sjlt", "none", "trak-cuda", "kron")
GRADIENT_ENGINES = ("vmap", "hooks")


@dataclass(frozen=True)
class AttributionConfig:
    outputs: tuple[str, ...] = _help(
        "output functions to featurize (loss = TRAK, square = D-TRAK; also elbo, avg, l1, "
        "l2, linf)",
        ("loss", "square"),
    )
    timesteps: str = _help("timestep schedule: uniform, cumulative, random", "uniform")
    n_timesteps: int = _help("K, timesteps per example (paper: 10, 100, 1000)", 10)
    proj_dim: int = _help("projection dimension k (paper: 4096 / 32768)", 4096)
    projector: str = _help(
        "gaussian, rademacher, srht (fast), sjlt, none (exact kernel), kron (factored per "
        "layer, never forms the gradient; needs gradients = hooks; the true k is near proj_dim)",
        "gaussian")
    gradients: str = _help(
        "per-sample gradient engine: vmap (the reference) or hooks (one batched forward and "
        "backward with layer hooks; equal to vmap up to float rounding)", "vmap")
    proj_seed: int = _help("projection seed", 0)
    noise_seed: int = _help("seed of the per-(example, timestep) noise", 0)
    batch_size: int = _help("examples per gradient batch (results do not depend on it)", 16)
    store_shard_rows: int | None = _help(
        "rows per shard of new feature stores (a multiple of batch_size): each shard its own "
        "folder of files, and `dtrak featurize --shards N` gives every worker whole shards; "
        "None: one file per store. Features do not depend on it", None)
    methods: tuple[str, ...] = _help("score methods to compute", ("trak", "dtrak"))
    lambdas: str = _help(
        "lambda grid: paper ({1,2,5} x 10^-2..10^6, absolute) or relative "
        "(the grid times trace(Phi^T Phi)/N)",
        "relative",
    )
    targets: tuple[str, ...] = _help("target sets to score: val, gen", ("val", "gen"))
    n_targets: int | None = _help("use the first n targets of each set (None: all)", None)
    checkpoints: tuple[int, ...] | None = _help(
        "training steps whose checkpoints TracIn averages (None: 4 evenly spaced)", None
    )
    clip_path: str | None = _help("local directory of a CLIP model (for clip baselines)", None)

    def validate(self) -> None:
        _check(len(self.outputs) >= 1, "attribution.outputs", "name at least one")
        _check(self.timesteps in ("uniform", "cumulative", "random"), "attribution.timesteps",
               "must be uniform, cumulative or random")
        _check(self.n_timesteps >= 1, "attribution.n_timesteps", "must be >= 1")
        _check(self.proj_dim >= 1, "attribution.proj_dim", "must be >= 1")
        _check(self.projector in PROJECTORS, "attribution.projector",
               f"must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        _check(self.gradients in GRADIENT_ENGINES, "attribution.gradients",
               f"must be one of {', '.join(GRADIENT_ENGINES)}, got {self.gradients!r}")
        _check(self.projector != "kron" or self.gradients == "hooks", "attribution.projector",
               "kron projects each layer's inputs and output gradients, which only the hook "
               "engine sees: set attribution.gradients = 'hooks'")
        _check(self.batch_size >= 1, "attribution.batch_size", "must be >= 1")
        rows = self.store_shard_rows
        _check(rows is None or (rows >= 1 and rows % self.batch_size == 0),
               "attribution.store_shard_rows",
               f"must be a positive multiple of attribution.batch_size ({self.batch_size}) so "
               f"that no gradient batch spans two shards, got {rows}; use e.g. "
               f"{self.batch_size * max(1, round((rows or 1) / self.batch_size))}, or omit it "
               "for one file per store")
        _check(self.n_targets is None or self.n_targets >= 1, "attribution.n_targets",
               "must be >= 1 (or omitted: every target)")
        _check(self.lambdas in ("paper", "relative"), "attribution.lambdas",
               "must be paper or relative")


@dataclass(frozen=True)
class LDSConfig:
    n_subsets: int = _help("M, random subsets (paper: 64)", 64)
    alpha: float = _help("subset fraction (paper: 0.5)", 0.5)
    seed_base: int = _help("subset m is drawn with random_state seed_base + 2m", 42)
    seeds: tuple[int, ...] = _help("training seeds per subset (paper: 0, 1, 2)", (0, 1, 2))
    eval_timesteps: int = _help("timesteps of the ground-truth loss (paper: all 1000)", 1000)
    noise_seeds: tuple[int, ...] = _help("noise seeds of the ground truth (paper: 3)", (0, 1, 2))
    n_boot: int = _help("bootstrap resamples for the 95% interval", 1000)

    def validate(self) -> None:
        _check(self.n_subsets >= 3, "lds.n_subsets", "must be >= 3 (a rank correlation over "
               "fewer subsets means nothing; the paper uses 64)")
        _check(0 < self.alpha < 1, "lds.alpha", "must be in (0, 1)")
        _check(len(self.seeds) >= 1, "lds.seeds", "name at least one seed")
        _check(self.eval_timesteps >= 1, "lds.eval_timesteps", "must be >= 1")
        _check(len(self.noise_seeds) >= 1, "lds.noise_seeds", "name at least one noise seed")
        _check(self.n_boot >= 10, "lds.n_boot", "must be >= 10 (every LDS carries its "
               "bootstrap interval; the paper-style default is 1000)")


@dataclass(frozen=True)
class CounterfactualConfig:
    n_targets: int = _help("generated targets (paper: 60)", 60)
    remove: float = _help("top-k removed: a count (>= 1) or a fraction (< 1) (paper: 1000)", 1000)
    methods: tuple[str, ...] = _help("methods compared", ("random", "trak", "dtrak"))
    seed: int = _help("seed of the retrained models and of the target choice (paper: 42)", 42)

    def validate(self) -> None:
        _check(self.n_targets >= 1, "counterfactual.n_targets", "must be >= 1")
        _check(self.remove > 0, "counterfactual.remove", "must be > 0")


@dataclass(frozen=True)
class DASConfig:
    residual_timesteps: int = _help(
        "timesteps (evenly spaced over the schedule) of each training example's residual "
        "weight e_i (DAS's code: all 1000)", 1000)
    residual_seed: int = _help("seed of the residual weights' noise draws", 0)

    def validate(self) -> None:
        _check(self.residual_timesteps >= 1, "das.residual_timesteps", "must be >= 1")


@dataclass(frozen=True)
class InfluenceConfig:
    factor_draws: int = _help(
        "(t, eps) draws per training example when fitting the K-FAC factors, each with one "
        "target sampled from the model (the GGN of the model)", 4)
    train_draws: int = _help(
        "(t, eps) draws averaged into each training example's gradient (their paper: 250)", 32)
    target_draws: int = _help(
        "(t, eps) draws averaged into each target's measurement gradient (their paper: 250)",
        32)
    seed: int = _help("seed of the draws", 0)
    batch_size: int = _help("rows (example, draw) per batch (results do not depend on it)", 64)

    def validate(self) -> None:
        for key in ("factor_draws", "train_draws", "target_draws", "batch_size"):
            _check(getattr(self, key) >= 1, f"influence.{key}", "must be >= 1")


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = _help(
        "where models run: auto (CUDA when present, else CPU), cpu, cuda, cuda:N", "auto"
    )
    dtype: str = _help(
        "dtype of the models in sampling, featurization and ground truth: float32, float64 "
        "(training keeps float32 weights; see train.mixed_precision)",
        "float32",
    )
    executor: str = _help("engine of the farms of independent jobs (dtrak.farm): local, ray",
                          "local")
    workers: int = _help("parallel jobs of a farm (local: processes, one torch thread each; "
                         "ray: jobs at once on the local Ray it starts)", 1)
    threads: int | None = _help("torch intra-op threads (None: torch's default)", None)
    ray_address: str | None = _help(
        "executor ray: None starts a local Ray on this machine; auto, HOST:PORT or "
        "ray://HOST:PORT joins a running cluster", None)
    num_cpus: float = _help("executor ray: CPUs per job (its torch threads)", 1.0)
    num_gpus: float = _help("executor ray: GPUs per job (0.5: two jobs share one)", 0.0)

    def validate(self) -> None:
        base = self.device.split(":")[0]
        _check(base in DEVICES and (":" not in self.device or base == "cuda"), "runtime.device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if ":" in self.device:
            index = self.device.split(":", 1)[1]
            _check(index.isdigit(), "runtime.device", f"cuda:N needs an integer N, got {index!r}")
        _check(self.dtype in DTYPES, "runtime.dtype", f"must be one of {', '.join(DTYPES)}")
        _check(bool(self.executor), "runtime.executor", "must name an executor, e.g. local")
        _check(self.workers >= 1, "runtime.workers", "must be >= 1")
        if self.threads is not None:
            _check(self.threads >= 1, "runtime.threads", "must be >= 1 (or omitted)")
        if self.ray_address is not None:
            a = self.ray_address
            _check(a == "auto" or (":" in a and a.rsplit(":", 1)[1].isdigit()),
                   "runtime.ray_address", "must be auto, HOST:PORT or ray://HOST:PORT (or "
                   f"omitted: a local Ray), got {a!r}")
        _check(self.num_cpus >= 1e-4, "runtime.num_cpus",
               f"must be > 0 (CPUs per job; 0.5: two jobs share one), got {self.num_cpus}")
        _check(self.num_gpus == 0 or self.num_gpus >= 1e-4, "runtime.num_gpus",
               f"must be 0 or > 0 (GPUs per job), got {self.num_gpus}")
        _check(self.num_gpus <= 1 or float(self.num_gpus).is_integer(), "runtime.num_gpus",
               f"must be a share of one GPU (<= 1) or a whole number, got {self.num_gpus}")


@dataclass(frozen=True)
class Config:
    name: str = _help("a name for the run", "run")
    stages: tuple[str, ...] = _help(
        "stages that `dtrak run` executes in order",
        ("data", "train", "generate", "featurize", "score", "lds", "report"),
    )
    data: DataConfig = _help("data set and splits", factory=DataConfig)
    model: ModelConfig = _help("UNet and noise schedule", factory=ModelConfig)
    train: TrainConfig = _help("training recipe", factory=TrainConfig)
    sampling: SamplingConfig = _help("generation", factory=SamplingConfig)
    attribution: AttributionConfig = _help("features and scores", factory=AttributionConfig)
    lds: LDSConfig = _help("linear datamodeling score", factory=LDSConfig)
    counterfactual: CounterfactualConfig = _help(
        "counterfactual evaluation", factory=CounterfactualConfig
    )
    das: DASConfig = _help("the DAS method's residual weights", factory=DASConfig)
    influence: InfluenceConfig = _help(
        "the K-FAC / EK-FAC influence methods: draws and batches", factory=InfluenceConfig)
    runtime: RuntimeConfig = _help(
        "device, dtype and executor (how and where, never what)", factory=RuntimeConfig
    )

    def validate(self) -> Config:
        for f in fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate()
        return self




# ----------------------------------------------------------------------------- dict I/O


def to_dict(cfg: Any) -> dict:
    """A JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    """Coerce a TOML/JSON value to the field's declared type (str annotations)."""
    t = str(f.type)
    if value is None:
        if "None" not in t:
            raise ConfigError(f"{key}: may not be empty")
        return None
    if t.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = "int" if "tuple[int" in t else ("str" if "tuple[str" in t else None)
        try:
            return tuple(int(v) if inner == "int" else v for v in value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a list of integers, got {value!r}") from e
    base = t.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base == "float":
            return float(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: expected {base}, got {value!r}") from e
    return value


def _section_from_dict(cls: type, d: dict, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"{prefix}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    kwargs = {k: _coerce(v, known[k], f"{prefix}.{k}") for k, v in d.items()}
    return cls(**kwargs)


# Keys of earlier versions and where they live now (configs and saved runs keep loading).
_MOVED = {("torch_threads",): ("runtime", "threads"), ("lds", "workers"): ("runtime", "workers")}


def _migrate(d: dict) -> dict:
    """A copy of ``d`` with the keys of earlier versions moved to their current place."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, (section, key) in _MOVED.items():
        holder = d if len(old) == 1 else d.get(old[0])
        if isinstance(holder, dict) and old[-1] in holder:
            value = holder.pop(old[-1])
            runtime = d.setdefault(section, {})
            if value is not None and key not in runtime:
                runtime[key] = value
    return d


def from_dict(d: dict, base: Config | None = None) -> Config:
    """Build a Config from a nested dict, starting from ``base`` (default: Config())."""
    cfg = base or Config()
    d = _migrate(d)
    d.pop("preset", None)
    updates: dict[str, Any] = {}
    sec_types = {f.name: f for f in fields(Config)}
    for key, value in d.items():
        if key not in sec_types:
            raise ConfigError(
                f"unknown config section or key {key!r}; known: {', '.join(sec_types)}"
            )
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table of keys, got {value!r}")
            merged = {**to_dict(current), **value}
            updates[key] = _section_from_dict(type(current), merged, key)
        else:
            updates[key] = _coerce(value, sec_types[key], key)
    return dataclasses.replace(cfg, **updates).validate()


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as TOML, else taken as text)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts = key.strip().split(".")
        if len(parts) == 1:
            nested[parts[0]] = value
        elif len(parts) == 2:
            nested.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(f"override key {key!r} must be section.key")
    return from_dict(nested, cfg)


# ----------------------------------------------------------------------------- presets


def _digits() -> Config:
    # Sized for `make demo` on 2 CPU cores (about 15 minutes). Deviations from the paper,
    # all for cost: 8x8 images, a 190K-parameter UNet, 100 epochs (800 steps; subset models
    # 400), lr 1e-3, no flips (digits are not
    # mirror-symmetric), 20 subsets x 1 seed, 100 ground-truth timesteps, common random
    # numbers across subset models, and a sparse (SJLT) projection.
    return Config(
        name="digits",
        stages=("data", "train", "generate", "featurize", "score", "lds", "report"),
        data=DataConfig(name="digits", resolution=None, train_size=500, val_size=200),
        model=ModelConfig(preset="digits", dropout=0.0),
        train=TrainConfig(steps=None, epochs=100, batch_size=64, lr=1e-3, hflip=False,
                          checkpoint_every=200, seed=42, common_init=True),
        sampling=SamplingConfig(n_images=200, steps=50, batch_size=100),
        attribution=AttributionConfig(
            outputs=("loss", "square", "avg", "l2"), n_timesteps=10, proj_dim=2048,
            projector="sjlt",
            batch_size=32, n_targets=100,
            methods=("trak", "dtrak", "kernel-avg", "kernel-l2", "random", "pixel-cos",
                     "grad-cos", "tracin-cos", "relative-if", "renorm-if", "journey-trak")),
        lds=LDSConfig(n_subsets=20, seeds=(0,), eval_timesteps=100, noise_seeds=(0,),
                      n_boot=500),
        counterfactual=CounterfactualConfig(n_targets=10, remove=100),
        runtime=RuntimeConfig(workers=2),
    )


def _tiny() -> Config:
    return Config(
        name="tiny",
        data=DataConfig(name="digits", resolution=8, train_size=64, val_size=16),
        model=ModelConfig(preset="tiny", dropout=0.0),
        train=TrainConfig(steps=40, batch_size=16, lr=2e-3, hflip=False, checkpoint_every=10),
        sampling=SamplingConfig(n_images=8, steps=5, batch_size=4),
        attribution=AttributionConfig(outputs=("loss", "square"), n_timesteps=3,
                                      proj_dim=64, projector="gaussian", batch_size=8),
        lds=LDSConfig(n_subsets=4, seeds=(0,), eval_timesteps=5, noise_seeds=(0,),
                      n_boot=50),
        counterfactual=CounterfactualConfig(n_targets=2, remove=8),
    )


def _cifar2_cpu() -> Config:
    # Real CIFAR-2 sized for 2 CPU cores: 1000 training images at 16x16, a 1.2M-parameter
    # UNet, 100 epochs; the paper's protocol otherwise (stratified splits, K = 10 uniform
    # timesteps, lambda chosen both ways). Pass the data with --set data.root=PATH.
    return Config(
        name="cifar2-cpu",
        data=DataConfig(name="cifar2", resolution=16, train_size=1000, val_size=200),
        model=ModelConfig(preset="cifar-cpu", dropout=0.1),
        train=TrainConfig(steps=None, epochs=100, batch_size=64, lr=5e-4, hflip=True,
                          checkpoint_every=400, common_init=True),
        sampling=SamplingConfig(n_images=200, steps=50, batch_size=100),
        attribution=AttributionConfig(outputs=("loss", "square"), n_timesteps=10,
                                      proj_dim=4096, projector="sjlt", batch_size=16,
                                      n_targets=100),
        lds=LDSConfig(n_subsets=24, seeds=(0,), eval_timesteps=100, noise_seeds=(0,),
                      n_boot=500),
        counterfactual=CounterfactualConfig(n_targets=10, remove=200),
        runtime=RuntimeConfig(workers=2),
    )


def _cifar2() -> Config:
    return Config(
        name="cifar2",
        data=DataConfig(name="cifar2", train_size=5000, val_size=1000),
        model=ModelConfig(preset="cifar"),
        train=TrainConfig(epochs=200, batch_size=128),
        sampling=SamplingConfig(n_images=1000),
        attribution=AttributionConfig(proj_dim=32768, projector="gaussian"),
        lds=LDSConfig(),
        counterfactual=CounterfactualConfig(),
    )


def _cifar10() -> Config:
    c = _cifar2()
    return dataclasses.replace(
        c, name="cifar10", data=DataConfig(name="cifar10", train_size=None, val_size=1000)
    )


def _celeba() -> Config:
    c = _cifar2()
    return dataclasses.replace(
        c,
        name="celeba",
        data=DataConfig(name="celeba", resolution=64, train_size=5000, val_size=1000),
        model=ModelConfig(preset="celeba"),
    )


def _artbench2() -> Config:
    # The paper's Stable Diffusion + LoRA recipe on ArtBench-2 (SPEC 8.1). Give the base with
    # --set model.pretrained=SD_DIR (a local Stable Diffusion 1.x folder) and the images with
    # --set data.root=ARTBENCH.
    return Config(
        name="artbench2",
        data=DataConfig(name="artbench", resolution=256, train_size=5000, val_size=1000),
        model=ModelConfig(family="sd-lora", lora_rank=128, lora_alpha=128.0,
                          caption_template="a {class} painting", caption_dropout=0.1,
                          dropout=0.0),
        train=TrainConfig(epochs=100, batch_size=64, lr=3e-4, adam_beta1=0.9,
                          weight_decay=1e-6, warmup_frac=0.1, grad_clip=1.0, hflip=True,
                          mixed_precision="fp16"),
        sampling=SamplingConfig(n_images=1000, steps=50, eta=0.0, guidance_scale=7.5,
                                save_trajectory=False, batch_size=16),
        attribution=AttributionConfig(proj_dim=32768, projector="gaussian"),
        lds=LDSConfig(),
        counterfactual=CounterfactualConfig(),
    )


PRESETS = {
    "artbench2": _artbench2,
    "digits": _digits,
    "tiny": _tiny,
    "cifar2-cpu": _cifar2_cpu,
    "cifar2": _cifar2,
    "cifar10": _cifar10,
    "celeba": _celeba,
}


def preset(name: str) -> Config:
    """A named preset (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


def load_config(source: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a config from a preset name, a TOML file or a saved config.json, plus overrides.

    A TOML file may start from a preset with ``preset = "name"``.
    """
    if source is None:
        cfg = preset("digits")
    elif str(source) in PRESETS:
        cfg = preset(str(source))
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(
                f"config {str(source)!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor an existing file"
            )
        text = path.read_text()
        try:
            d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot parse: {e}") from e
        base = preset(d["preset"]) if "preset" in d else Config()
        cfg = from_dict(d, base)
    return apply_overrides(cfg, overrides) if overrides else cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_configs(a: Config | dict, b: Config | dict, sections: tuple[str, ...] | None = None
                 ) -> list[str]:
    """Dotted keys whose values differ between two configs (optionally only some sections)."""
    fa = _flatten(a if isinstance(a, dict) else to_dict(a))
    fb = _flatten(b if isinstance(b, dict) else to_dict(b))
    keys = sorted(set(fa) | set(fb))
    if sections is not None:
        keys = [k for k in keys if k.split(".")[0] in sections]
    return [k for k in keys if fa.get(k) != fb.get(k)]


def section_from_dict(cls: type, d: dict, prefix: str) -> Any:
    """One config section (e.g. TrainConfig) from a dict, validated."""
    sec = _section_from_dict(cls, d, prefix)
    sec.validate()
    return sec
