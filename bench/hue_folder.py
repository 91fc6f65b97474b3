"""Write an image folder that only colour can tell apart: three classes of squares whose colours have equal
luminance (ITU-R 601-2, what converting RGB to grayscale keeps), on random gray backgrounds with the same gray
noise in every channel. Converted to grayscale the three classes are the same images, so a run that keeps colour
can learn it and a grayscale one cannot (chance: 33%).

    python bench/hue_folder.py /tmp/hues --per-class 400 --size 64
    fastcnn train --dataset imagefolder --data-dir /tmp/hues
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from PIL import Image

HUES = {"blue": (100, 104, 255), "green": (40, 170, 72), "red": (220, 80, 64)}


def write_hue_folder(root: pathlib.Path, per_class: int = 400, size: int = 64, seed: int = 0) -> pathlib.Path:
    lumas = {Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)) for colour in HUES.values()}
    assert len(lumas) == 1, f"the colours must have one luminance, not {lumas}"
    rng = np.random.default_rng(seed)
    for name, colour in HUES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.full((size, size, 3), rng.integers(0, 256), dtype=np.int16)
            side = rng.integers(size // 4, size // 2 + 1)
            top, left = rng.integers(0, size - side + 1, 2)
            image[top:top + side, left:left + side] = colour
            image += rng.integers(-6, 7, (size, size))[..., None]
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:04d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=pathlib.Path)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_hue_folder(args.root, args.per_class, args.size, args.seed)
    print(f"wrote {3 * args.per_class} {args.size}x{args.size} PNGs in {len(HUES)} classes to {args.root}")


if __name__ == "__main__":
    main()
