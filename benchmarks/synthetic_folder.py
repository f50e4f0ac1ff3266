"""Write a synthetic image folder (one sub-folder per class) of RGB PNGs, for the streaming benchmark.

    python benchmarks/synthetic_folder.py OUT [--classes 10] [--per-class 500] [--size 64] [--seed 0]

Each class is a coloured shape (its own hue and shape kind) at a random place and size on a random
two-colour gradient, with pixel noise, so the PNGs compress and decode about like small photos
(roughly 9 KB at 64 px) rather than like flat test patterns. Then:

    dds shard imagefolder:OUT --name synth64
    dds bench-train synth64 --no-cache --decode-workers 1
"""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(rng: np.random.Generator, cls: int, classes: int, size: int) -> Image.Image:
    """One image of class ``cls``: gradient background, the class's shape in the class's hue, noise."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None] * np.ones((size, 1, 1))
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    hue = cls / classes
    colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.5 + 0.5 * rng.random(), 0.6 + 0.4 * rng.random()))
    r = rng.uniform(0.15, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    kind = cls % 3
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    noisy = np.asarray(img, np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    for c in range(a.classes):
        folder = a.out / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(a.per_class):
            make_image(rng, c, a.classes, a.size).save(folder / f"{i:05d}.png")
    print(f"wrote {a.classes * a.per_class} images of {a.size} px under {a.out}")


if __name__ == "__main__":
    main()
