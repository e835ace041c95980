"""Cost of checking that every image decodes at conversion (`datasets_scripts.image_checks.find_bad_images`) against
the whole conversion (`build_custom`, which includes the check), and against a full decode of every image.

    python -m benchmarks.bench_image_check [--n 400]

Images: photo-like 500x375 (CIRR/FashionIQ-sized), half JPEG (quality 90), half PNG. Ratios, one process.
"""

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_scripts.custom import build_custom
from datasets_scripts.image_checks import find_bad_images, image_problem


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.linspace(0, 255, 375), np.linspace(0, 255, 500))[..., None] / 2
    paths = []
    for i in range(n):
        pixels = (ramp + rng.normal(0, 20, (375, 500, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(pixels).save(path, **({"quality": 90} if i % 2 else {}))
        paths.append(path)
    return paths


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def full_decode(paths):
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "imgs", args.n)
        with open(tmp / "pairs.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["reference", "text", "target"])
            writer.writerows((p.name, "make it blue", paths[(i + 1) % len(paths)].name) for i, p in enumerate(paths))
        full_decode(paths)  # warm the page cache
        check_1 = timed(lambda: [image_problem(p) for p in paths])
        check = timed(lambda: find_bad_images(paths))
        decode = timed(lambda: full_decode(paths))
        convert = timed(lambda: build_custom(tmp / "imgs", tmp / "pairs.csv", tmp / "out"))
    print(f"{args.n} images (500x375, half JPEG / half PNG):")
    print(f"  check, one thread      {check_1:.2f} s = {check_1 / decode:.2f}x a full decode (convert('RGB'))")
    print(f"  check, threads         {check:.2f} s")
    print(f"  whole conversion       {convert:.2f} s (includes the threaded check: {check / convert:.0%} of it)")


if __name__ == "__main__":
    main()
