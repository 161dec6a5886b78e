"""An image folder the presets were never tuned on: random crops of the two photos scikit-learn ships.

    python benchmarks/photo_crops.py /tmp/photo-crops
    python benchmarks/quality.py --preset digits --methods hdebm --name photo_crops \\
        --set data.dataset=image_folder --set data.path=/tmp/photo-crops --set data.channels=3

Each photo (``china.jpg``, ``flower.jpg``, 427×640) is cut into a 2×2 grid of regions; every crop is a random
square of ``--crop-px`` pixels inside one region, saved as a PNG under a folder named after its photo and region
(8 classes). The class folders are what ``eval.features = classifier`` trains its feature net on, so FID there
measures whether samples look like the regions' textures and colours, the way the digit classes do for digits.
Refuses a folder that already holds images (nothing is overwritten unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REGIONS = 2  # a REGIONS x REGIONS grid per photo


def photo_crops(out: Path, n: int, crop_px: int, seed: int = 0) -> dict[str, int]:
    """Write ``n`` crops (as evenly over the classes as ``n`` allows) below ``out``; returns the count per class."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    rng = np.random.default_rng(seed)
    classes = []
    for name, img in zip(data.filenames, data.images, strict=True):
        h, w = img.shape[0] // REGIONS, img.shape[1] // REGIONS
        for r in range(REGIONS):
            for c in range(REGIONS):
                classes.append((f"{Path(name).stem}_r{r}c{c}", img[r * h : (r + 1) * h, c * w : (c + 1) * w]))
    counts = {}
    for k, (label, region) in enumerate(classes):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        count = n // len(classes) + (k < n % len(classes))
        for i in range(count):
            y = rng.integers(0, region.shape[0] - crop_px + 1)
            x = rng.integers(0, region.shape[1] - crop_px + 1)
            Image.fromarray(region[y : y + crop_px, x : x + crop_px]).save(folder / f"{i:05d}.png")
        counts[label] = count
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder to write (class sub-folders of PNGs)")
    p.add_argument("--n", type=int, default=2000, help="crops in all")
    p.add_argument("--crop-px", type=int, default=48, help="side of each square crop, in pixels of the photo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a folder that already holds images")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not 8 <= args.crop_px <= 200:
        p.error(f"--crop-px {args.crop_px}: must be within 8..200 (a region is 213x320 px)")
    if args.n < 8:
        p.error(f"--n {args.n}: must be at least 8 (one crop per class)")
    if out.exists() and any(out.rglob("*.png")):
        if not args.overwrite:
            p.error(f"{out} already holds images; pass --overwrite to replace them")
        shutil.rmtree(out)
    counts = photo_crops(out, args.n, args.crop_px, args.seed)
    print(f"wrote {sum(counts.values())} crops of {args.crop_px} px in {len(counts)} class folders to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
