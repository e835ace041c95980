"""De-duplication benchmark: content hashing (`datasets_scripts.dedup`, O(N)) vs pairwise pixel comparison
(what the original `zscir/deduplicate_images.py` does, O(N^2)) on 2,000 small images, 10% duplicated.

    python -m benchmarks.bench_dedup
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_scripts.dedup import canonical_map, find_duplicate_groups


def make_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    unique = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(int(n * 0.9))]
    arrays = unique + [unique[i] for i in rng.integers(0, len(unique), n - len(unique))]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def ours(paths):
    def images():
        for p in paths:
            with Image.open(p) as image:
                yield p.stem, image.copy()

    return canonical_map(find_duplicate_groups(images(), show_progress_bar=False))


def pairwise(paths):
    arrays = []
    for p in paths:
        with Image.open(p) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    mapping = {}
    for i in range(len(arrays)):
        if paths[i].stem in mapping:
            continue
        for j in range(i + 1, len(arrays)):
            if arrays[i].shape == arrays[j].shape and np.array_equal(arrays[i], arrays[j]):
                mapping.setdefault(paths[j].stem, paths[i].stem)
    return mapping


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.n)
        t0 = time.perf_counter()
        a = ours(paths)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = pairwise(paths)
        t_pairwise = time.perf_counter() - t0
    assert a == b, "the two methods disagree"
    print(f"{args.n} images of 32x32, {len(a)} duplicates")
    print(f"  hashing  : {t_ours:7.2f} s")
    print(f"  pairwise : {t_pairwise:7.2f} s")
    print(f"  ratio    : {t_pairwise / t_ours:7.1f}x faster")
