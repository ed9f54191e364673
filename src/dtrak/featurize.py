"""Featurization: examples -> projected per-sample gradient features in a store.

phi(z) = P^T g(z), g(z) = (1/K) sum_t grad_theta f(eps_theta(x_t, t), eps) (SPEC section 4).
The core, :func:`featurize_into`, works on any :class:`~dtrak.gradients.DiffusionAdapter`
and tensor of examples; :func:`FeatureSpec` names what was computed, and the store refuses
to mix features made with other settings. Work goes in batches of missing examples, so a
killed run resumes, and ``shard=(i, N)`` lets N workers fill one store at once.
``shard_rows`` puts a new store's rows into shards of that many rows
(:class:`~dtrak.store.ShardedStore`; None: one file); the workers then take whole store
shards, each writing only its own shard files. Layout and sharding never change a feature.

``gradients`` chooses the per-sample gradient engine: ``vmap`` (:mod:`dtrak.gradients`, the
reference) or ``hooks`` (:mod:`dtrak.hooks`, one batched backward). They agree to float
rounding, so the engine is not part of the spec or the store's metadata (a store may be
completed with the other engine; bit-for-bit resumption holds for one engine). The
``kron`` projector needs ``hooks``: it projects each layer's inputs and output gradients.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GRADIENT_ENGINES
from .families.base import DiffusionAdapter
from .gradients import (
    _module_device_dtype,
    param_order,
    per_sample_gradients,
    per_sample_gradients_multi,
    per_sample_unit_gradients,
    selected_parameters,
)
from .hooks import hook_gradients, kron_layers
from .noise import ScheduleConstants, timesteps
from .projection import KronProjector, Projector, make_projector
from .seeding import seed_from
from .store import FeatureStore, ShardedStore, make_store, open_store

log = logging.getLogger(__name__)

__all__ = ["FeatureSpec", "featurize_into", "featurize_many", "finished_features",
           "finished_store", "model_seed", "projector_for", "todo_blocks"]


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines a feature vector, apart from the model and the example."""

    output: str = "loss"
    schedule: str = "uniform"
    n_timesteps: int = 10
    projector: str = "gaussian"
    proj_dim: int = 4096
    proj_seed: int = 0
    noise_seed: int = 0
    journey: bool = False  # target features along the sampling trajectory (Journey TRAK)
    unit: bool = False  # each timestep's gradient scaled to unit norm before the mean (DAS)

    @property
    def name(self) -> str:
        head = f"journey-{self.output}" if self.journey else self.output
        tail = "-unit" if self.unit else ""
        return f"{head}-{self.schedule}{self.n_timesteps}-{self.projector}{self.proj_dim}{tail}"

    def describe(self) -> dict:
        """The spec as stored in a store's metadata (``unit`` only when set, so stores made
        before it existed keep matching)."""
        d = asdict(self)
        if not self.unit:
            del d["unit"]
        return d

    def timesteps(self, T: int) -> torch.Tensor:
        return timesteps(self.schedule, self.n_timesteps, T, seed=self.noise_seed)


def model_seed(model_id: str) -> int:
    """An integer id for a model name: projections differ per model, as in TRAK."""
    return seed_from("model", model_id) % (2**31 - 1)


def projector_for(spec: FeatureSpec, p: int, model_id: str, module: torch.nn.Module | None = None,
                  param_names: list[str] | None = None) -> Projector:
    """The projection of ``spec`` for gradients of dimension ``p`` of model ``model_id``;
    ``kron`` also needs the model (``module``, ``param_names``: its layer layout)."""
    k = p if spec.projector == "none" else spec.proj_dim
    options = {}
    if spec.projector == "kron":
        if module is None:
            raise ValueError("projector 'kron' is built from the model's layers: pass module=")
        order = param_order(module, param_names)
        options = {"order": order, "layers": kron_layers(module, order)}
    return make_projector(spec.projector, p, k, seed=spec.proj_seed,
                          model_id=model_seed(model_id), **options)


def _check_engine(gradients: str, spec: FeatureSpec) -> None:
    if spec.unit and spec.projector == "kron":
        raise ValueError("unit-normalised features (spec.unit, DAS) need each timestep's full "
                         "gradient, which the kron projector never forms: use another projector")
    if gradients not in GRADIENT_ENGINES:
        raise ValueError(f"unknown gradient engine {gradients!r}; use one of "
                         f"{', '.join(GRADIENT_ENGINES)}")
    if spec.projector == "kron" and gradients != "hooks":
        raise ValueError("projector 'kron' projects each layer's inputs and output gradients, "
                         "which only the hook engine sees: use gradients='hooks' "
                         "(attribution.gradients = 'hooks')")


class _Scratch:
    """One reusable gradient buffer per shape, for the hook engine's ``out``: a fresh
    ``[outputs, B, p]`` array per block costs a page fault per 4 KiB page. The gradients in
    it are projected before the next block overwrites them."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
            ) -> torch.Tensor:
        key = (shape, dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self.buffers[key]


def _features(adapter: DiffusionAdapter, gradients: str, projector: Projector, x0, ids,
              outputs: list[str], ts, sched, noise_seed, cond, names, multi: bool,
              unit: bool = False, scratch: _Scratch | None = None) -> torch.Tensor:
    """Projected features ``[len(outputs), B, k]`` of one batch with the chosen engine
    (``vmap``: ``multi`` picks the several-output call, whose rounding the stores of
    :func:`featurize_many` have always had). ``unit`` features need each timestep's
    gradient, which the hook engine sums away: they always take the vmap path."""
    if unit:
        return torch.stack([projector.project(per_sample_unit_gradients(
            adapter, x0, ids, o, ts, sched, noise_seed, cond=cond, param_names=names))
            for o in outputs])
    if gradients == "hooks":
        kron = projector if isinstance(projector, KronProjector) else None
        out = None
        if kron is None and scratch is not None:
            device, dtype = _module_device_dtype(adapter.module)
            out = scratch.get((len(outputs), len(ids), projector.p), dtype, device)
        g = hook_gradients(adapter, x0, ids, outputs, ts, sched, noise_seed, cond=cond,
                           param_names=names, projector=kron, out=out)
        return g if kron is not None else torch.stack([projector.project(gj) for gj in g])
    if not multi:
        g = per_sample_gradients(adapter, x0, ids, outputs[0], ts, sched, noise_seed,
                                 cond=cond, param_names=names)  # checked finite there
        return projector.project(g).unsqueeze(0)
    g = per_sample_gradients_multi(adapter, x0, ids, outputs, ts, sched, noise_seed, cond=cond,
                                   param_names=names)
    return torch.stack([projector.project(gj) for gj in g])


def featurize_into(
    adapter: DiffusionAdapter,
    examples,
    directory: str | Path,
    spec: FeatureSpec,
    sched: ScheduleConstants,
    model_id: str,
    set_name: str,
    batch_size: int = 16,
    shard: tuple[int, int] = (0, 1),
    timestep_values: torch.Tensor | None = None,
    param_names: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    gradients: str = "vmap",
    shard_rows: int | None = None,
) -> FeatureStore | ShardedStore:
    """Compute the features of ``examples`` into the store at ``directory``.

    Args:
        adapter: the model (``family.adapter(model)``, e.g. ``UNet2DAdapter(unet)``); used in
            eval mode where it is (its device and dtype).
        examples: raw examples indexed by id (``examples[LongTensor]`` gives the batch that
            ``adapter.prepare`` turns into ``(x0, cond)``), e.g. images ``[N, C, H, W]``,
            ``[N, K, C, H, W]`` (one clean image per timestep, Journey TRAK), or
            :class:`~dtrak.families.unet2d.LabelledImages` (a class-conditional UNet).
        sched: the model's own noise schedule (``ScheduleConstants.from_scheduler``): its
            timesteps, noise levels and the output functions' weights.
        spec: output function, timesteps, projector, seeds.
        model_id: names the model; seeds its projection and is stored in the metadata.
        set_name: names the example set (train, val, gen, ...); salts the noise so two
            sets never share noise draws.
        timestep_values: explicit timesteps ``[K]`` (overrides ``spec``'s schedule).
        gradients: the per-sample gradient engine, ``vmap`` or ``hooks`` (see the module).
        shard_rows: rows per shard of a new store (a multiple of ``batch_size``), or None
            for one file; a store already at ``directory`` keeps its layout.
    Returns:
        The store (``.load()`` gives the ``[N, k]`` features once complete).
    """
    _check_engine(gradients, spec)
    module = adapter.module
    module.eval()
    T = len(sched.alphas_cumprod)
    ts = spec.timesteps(T) if timestep_values is None else timestep_values
    names = selected_parameters(adapter, param_names)
    p = sum(n for _, n in param_order(module, names))
    projector = projector_for(spec, p, model_id, module, names)
    noise_seed = seed_from(spec.noise_seed, "set", set_name) % (2**62)
    meta = _store_meta(spec, model_id, set_name, p, ts, projector)
    store = make_store(directory, len(examples), projector.k, meta, shard_rows, overwrite)
    blocks = todo_blocks([store], batch_size, shard)
    missing = store.missing_mask()
    bar = tqdm(total=int(sum(missing[b].sum() for b in blocks)),
               desc=f"features {set_name}/{spec.name}",
               disable=not progress or not blocks, leave=False)
    scratch = _Scratch()
    for ids in blocks:
        x0, cond = adapter.prepare(examples[torch.as_tensor(ids)])
        feats = _features(adapter, gradients, projector, x0, torch.as_tensor(ids),
                          [spec.output], ts, sched, noise_seed, cond, names, multi=False,
                          unit=spec.unit, scratch=scratch)
        bar.update(_write_missing(store, ids, feats[0]))
    bar.close()
    return store


def _store_meta(spec: FeatureSpec, model_id: str, set_name: str, p: int, ts: torch.Tensor,
                projector: Projector) -> dict:
    """What a store records about its features (and refuses to mix)."""
    return {"spec": spec.describe(), "feature": spec.name, "model_id": model_id, "set": set_name,
            "p": p, "timesteps": [int(t) for t in ts], "projector": projector.describe()}


def finished_store(
    adapter: DiffusionAdapter,
    n: int,
    directory: str | Path,
    spec: FeatureSpec,
    sched: ScheduleConstants,
    model_id: str,
    set_name: str,
) -> FeatureStore | ShardedStore | None:
    """The complete store at ``directory`` (either layout) made with exactly these settings
    (what :func:`featurize_into` would write there), opened for reading, its features not
    loaded; None when there is no such store (missing, unfinished or made otherwise)."""
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        return None
    saved = json.loads((directory / "meta.json").read_text())
    ts = spec.timesteps(len(sched.alphas_cumprod))
    names = selected_parameters(adapter)
    p = sum(k for _, k in param_order(adapter.module, names))
    projector = projector_for(spec, p, model_id, adapter.module, names)
    meta = {**_store_meta(spec, model_id, set_name, p, ts, projector), "n": int(n),
            "k": int(projector.k)}
    if "shard_rows" in saved:  # either layout holds the same features
        meta["shard_rows"] = saved["shard_rows"]
    if saved != json.loads(json.dumps(meta, sort_keys=True)):
        return None
    store = open_store(directory)
    return store if store.complete else None


def finished_features(
    adapter: DiffusionAdapter,
    n: int,
    directory: str | Path,
    spec: FeatureSpec,
    sched: ScheduleConstants,
    model_id: str,
    set_name: str,
) -> np.ndarray | None:
    """The ``[n, k]`` features of :func:`finished_store`'s store, or None."""
    store = finished_store(adapter, n, directory, spec, sched, model_id, set_name)
    return None if store is None else store.load()


def todo_blocks(stores: list[FeatureStore | ShardedStore], batch_size: int,
                shard: tuple[int, int] = (0, 1)) -> list[np.ndarray]:
    """The batches of example ids still to compute: fixed blocks ``[b*B, (b+1)*B)`` of the
    whole set that miss a row in any of ``stores``. Shard ``(i, N)`` takes the blocks with
    ``b % N == i``, or, when every store is sharded alike (:func:`_worker_rows`), the
    blocks in the store shards ``s`` with ``s % N == i``. An example is always computed in
    the same batch, whatever the sharding, the store layout and however often the run was
    killed and resumed, so the features are bit for bit those of one uninterrupted run
    (batched float kernels round by batch composition)."""
    i, n_workers = shard
    n = stores[0].n
    missing = np.zeros(n, dtype=bool)
    for st in stores:
        missing |= st.missing_mask()
    unit = _worker_rows(stores, batch_size)
    return [np.arange(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)
            if (lo // unit) % n_workers == i and missing[lo:lo + batch_size].any()]


def _worker_rows(stores: list[FeatureStore | ShardedStore], batch_size: int) -> int:
    """The rows a worker takes at a time: one store shard when all ``stores`` have shards of
    the same size (each worker then writes its own shard files), else one block."""
    rows = {st.shard_rows for st in stores}
    return rows.pop() if len(rows) == 1 and None not in rows else batch_size


def _write_missing(store: FeatureStore | ShardedStore, ids: np.ndarray,
                   feats: torch.Tensor) -> int:
    """Write the rows of ``ids`` that ``store`` lacks (rows it holds are kept); their count."""
    keep = ~store.done_rows(ids)
    if keep.any():
        store.write(ids[keep], feats[torch.as_tensor(keep)].float().cpu().numpy())
    return int(keep.sum())


def featurize_many(
    adapter: DiffusionAdapter,
    examples,
    directories: dict[str, str | Path],
    spec: FeatureSpec,
    sched: ScheduleConstants,
    model_id: str,
    set_name: str,
    batch_size: int = 16,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    gradients: str = "vmap",
    shard_rows: int | None = None,
) -> dict[str, FeatureStore | ShardedStore]:
    """:func:`featurize_into` for several output functions at once (one store each).

    ``directories`` maps output names to store directories; ``spec`` gives everything but
    the output. Each batch (a fixed block, :func:`todo_blocks`) shares one forward pass
    across all the outputs (:func:`~dtrak.gradients.per_sample_gradients_multi`); a store
    only receives the rows it is missing, so stores made earlier, one output at a time, are
    completed, not rewritten. The features equal those of :func:`featurize_into` (same
    noise, timesteps, projection) to float rounding, and a resumed or sharded run
    (``shard=(i, N)``, as in :func:`featurize_into`) equals one uninterrupted run bit for bit.
    ``gradients`` chooses the engine (``hooks``: one backward per output after one forward);
    ``shard_rows`` the layout of new stores (as in :func:`featurize_into`).
    """
    _check_engine(gradients, spec)
    module = adapter.module
    module.eval()
    T = len(sched.alphas_cumprod)
    ts = spec.timesteps(T)
    names = selected_parameters(adapter)
    p = sum(n for _, n in param_order(module, names))
    projector = projector_for(spec, p, model_id, module, names)  # does not depend on f
    noise_seed = seed_from(spec.noise_seed, "set", set_name) % (2**62)
    stores = {o: make_store(d, len(examples), projector.k,
                            _store_meta(replace(spec, output=o), model_id, set_name, p, ts,
                                        projector), shard_rows)
              for o, d in directories.items()}
    blocks = todo_blocks(list(stores.values()), batch_size, shard)
    outs = list(directories)  # always every output: a block's rounding never depends on
    # which of its stores a killed run had already written
    bar = tqdm(total=sum(len(b) for b in blocks), desc=f"features {set_name}/{'+'.join(outs)}",
               disable=not progress or not blocks, leave=False)
    scratch = _Scratch()
    for ids in blocks:
        x0, cond = adapter.prepare(examples[torch.as_tensor(ids)])
        feats = _features(adapter, gradients, projector, x0, torch.as_tensor(ids), outs, ts,
                          sched, noise_seed, cond, None, multi=True, unit=spec.unit,
                          scratch=scratch)
        for j, o in enumerate(outs):
            _write_missing(stores[o], ids, feats[j])
        bar.update(len(ids))
    bar.close()
    return stores
