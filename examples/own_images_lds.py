"""Train a model on your own image folder, attribute with TRAK and D-TRAK, measure the LDS.

    python examples/own_images_lds.py IMAGES RUN    # IMAGES/<class>/*.png (or train/, test/)
    python examples/own_images_lds.py --tiny RUN    # 40 digits written as PNG files, tiny model

Every stage resumes: run it again after a kill and it continues where it stopped.
"""

import dataclasses
import sys
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_digits

from dtrak import pipeline
from dtrak.config import DataConfig, apply_overrides, preset

tiny = sys.argv[1] == "--tiny"
out = Path(sys.argv[2])
root = out.parent / f"{out.name}-images" if tiny else Path(sys.argv[1])
if tiny:  # a small image folder: 20 zeros and 20 ones, 8x8 grey
    digits = load_digits()
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(digits.images[digits.target == label][:20]):
            Image.fromarray((image * 15.9).astype("uint8")).save(root / f"{label}/{i:03d}.png")

cfg = preset("tiny" if tiny else "cifar2-cpu")  # model, training, feature and LDS sizes
cfg = dataclasses.replace(cfg, data=DataConfig(name="imagefolder", root=str(root),
                                               resolution=8 if tiny else 16, val_size=8))
cfg = apply_overrides(cfg, ["attribution.targets=['val']", "attribution.methods=['trak','dtrak']",
                            "runtime.workers=1"]
                      + (["train.steps=20", "lds.n_subsets=3", "attribution.n_timesteps=2"]
                         if tiny else []))
run = pipeline.open_run(out, cfg, progress=not tiny)
results = pipeline.run_stages(run, ("data", "train", "featurize", "score", "lds"))
print("\n".join(results["lds"]["table"]))
print(f"scores: {run.paths.root / 'scores'}, LDS: {run.paths.results / 'lds.json'}")
