"""Export a dataset's test images as PNG files, and score ``fastcnn predict --json`` on them: to check that
predict sees image files the way training saw the dataset.

    python bench/export_images.py export fashion-mnist 300 /tmp/fashion-png     # /tmp/fashion-png/00000_9.png ...
    fastcnn predict runs/fashion/checkpoint.pt /tmp/fashion-png/*.png --json > /tmp/predict.json
    python bench/export_images.py score /tmp/predict.json                         # accuracy from the file names
    fastcnn eval runs/fashion/checkpoint.pt --test-subset 300                     # the same images, as tensors
"""

from __future__ import annotations

import argparse
import json
import pathlib

from PIL import Image

from fastcnn.data import DATASETS, load_dataset


def export(dataset: str, count: int, out: pathlib.Path, data_dir: str | None) -> None:
    test = load_dataset(dataset, False, root=data_dir, download=False).subset(count)
    out.mkdir(parents=True, exist_ok=True)
    for index, (pixels, label) in enumerate(zip(test.images, test.labels, strict=True)):
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(out / f"{index:05d}_{int(label)}.png")
    print(f"wrote the first {len(test)} {dataset} test images to {out} (<index>_<label>.png)")


def score(predictions: pathlib.Path) -> None:
    results = json.loads(predictions.read_text())["predictions"]
    right = sum(r["index"] == int(pathlib.Path(r["path"]).stem.split("_")[1]) for r in results)
    print(f"predict: {100 * right / len(results):.2f}% ({right}/{len(results)}) right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("count", type=int)
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--data-dir")
    p = sub.add_parser("score")
    p.add_argument("predictions", type=pathlib.Path)
    args = parser.parse_args()
    if args.command == "export":
        export(args.dataset, args.count, args.out, args.data_dir)
    else:
        score(args.predictions)


if __name__ == "__main__":
    main()
