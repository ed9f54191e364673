"""Which training images made these samples? Attribute a diffusers pipeline's samples.

    python examples/attribute_pipeline.py PIPELINE_DIR TRAIN_IMAGES [N_SAMPLES]
    python examples/attribute_pipeline.py --tiny     # a tiny untrained pipeline, made here

PIPELINE_DIR is what DDPMPipeline(unet, scheduler).save_pretrained(DIR) writes; its own
noise schedule (beta schedule, T, prediction type) is used for the features.
"""

import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dtrak.featurize import FeatureSpec
from dtrak.images import save_pngs
from dtrak.stages.attribute import attribute_images

work = Path(tempfile.mkdtemp(prefix="dtrak-example-"))
tiny = sys.argv[1:2] == ["--tiny"]
if tiny:  # a 8x8 grey UNet with a cosine schedule, random "data"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    sched = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(work / "pipeline")
    save_pngs(torch.rand(16, 1, 8, 8) * 2 - 1, work / "train")
    pipeline_dir, data, n, steps = work / "pipeline", work / "train", 2, 5
else:
    pipeline_dir, data = Path(sys.argv[1]), Path(sys.argv[2])
    n, steps = int(sys.argv[3]) if len(sys.argv) > 3 else 2, 50

pipe = DDPMPipeline.from_pretrained(pipeline_dir)
samples = pipe(batch_size=n, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0)).images  # PIL images
for i, image in enumerate(samples):
    image.save(work / f"sample-{i}.png")

spec = FeatureSpec(output="square", n_timesteps=2 if tiny else 10,  # D-TRAK
                   proj_dim=64 if tiny else 2048)
results = attribute_images(pipeline_dir, data, sorted(work.glob("sample-*.png")), spec,
                           cache_dir=work / "cache" if tiny else None, progress=False)
print(results[0].source)
for res in results:
    print(f"{res.target.name}: top proponents")
    for _, score, path in res.top(3):
        print(f"  {score:+.3e}  {path}")
