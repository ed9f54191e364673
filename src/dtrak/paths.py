"""The one place that maps (run, stage, ids) to paths.

Run directory layout::

    RUN/config.json                       resolved config of the run (JSON)
    RUN/data/splits.json                  chosen source indices and labels of train / val
    RUN/data/content.json                 digests of the train / val images
    RUN/data/summary.json, preview.png    sizes, class counts, a grid of training images
    RUN/data/train_images.npy             the training images farm workers read (with
                                          .captions.json and .cache.json, the encoding
                                          cache they read, for a text-conditioned family)
    RUN/cache/<set>/                      a set (train, val, gen) encoded once: latents and
                                          text embeddings (dtrak.families.sd_lora)
    RUN/model/                            the full model (see dtrak.train for its layout)
    RUN/gen/images.npy, done.npy          generated images [N, C, H, W] in [-1, 1], done mask
    RUN/gen/trajectory.npy                predicted x0 at every sampling step [N, S, C, H, W]
    RUN/gen/png/000000.png ..., grid.png  the same as PNG files
    RUN/features/<model>/<targets>/<feat>/features.npy, done.npy, meta.json
                                          projected gradient features [N, k] (see dtrak.store)
    RUN/features/<model>/<targets>/<feat>/meta.json, shard-<SSSSS>/features.npy, done.npy,
                                          meta.json: the same, sharded by
                                          attribution.store_shard_rows (rows per shard)
    RUN/scores/<method>/<targets>.npy     score matrix [targets, train] (+ .json metadata)
    RUN/lds/masks.npy                     subset inclusion masks [M, N] (bool)
    RUN/lds/models/m<MMM>-s<S>/           one retrained model per (subset, seed)
    RUN/lds/jobs.json                     the job table of the retraining farm
    RUN/lds/truth/<targets>.npy           ground-truth losses [seeds, M, targets]
    RUN/pool/masks.npy, jobs.json         the empirical-influence / datamodel model pool:
                                          subsets [M, N] drawn apart from the LDS ones
    RUN/pool/models/m<MMM>-s<S>/          one pool model per (subset, seed)
    RUN/pool/truth/<targets>.npy          pool models' losses [seeds, M, targets]
    RUN/results/lds.json                  LDS records (method, targets, lds, interval, lambda)
    RUN/counterfactual/...                counterfactual models, images, metrics
    RUN/report/index.html                 the report, with its PNG figures beside it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunPaths"]


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- top level
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def splits(self) -> Path:
        return self.data / "splits.json"

    @property
    def data_content(self) -> Path:
        return self.data / "content.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def gen(self) -> Path:
        return self.root / "gen"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def cache(self) -> Path:
        """Encoded example sets (a latent model's latents and text embeddings)."""
        return self.root / "cache"

    @property
    def lds(self) -> Path:
        return self.root / "lds"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    @property
    def counterfactual(self) -> Path:
        return self.root / "counterfactual"

    # --- parameterised
    def features(self, model_id: str, targets: str, feature_name: str) -> Path:
        return self.root / "features" / model_id / targets / feature_name

    def scores(self, method: str, targets: str) -> Path:
        return self.root / "scores" / method / f"{targets}.npy"

    def lds_model(self, subset: int, seed: int) -> Path:
        return self.lds / "models" / f"m{subset:03d}-s{seed}"

    def truth(self, targets: str) -> Path:
        return self.lds / "truth" / f"{targets}.npy"

    def pool_model(self, subset: int, seed: int) -> Path:
        return self.pool / "models" / f"m{subset:03d}-s{seed}"

    def pool_truth(self, targets: str) -> Path:
        return self.pool / "truth" / f"{targets}.npy"
