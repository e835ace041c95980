"""Exact duplicate images (same decoded pixels), grouped in O(N) by a content hash.

SPN merges duplicate images so that the candidate bank holds each picture once: otherwise a copy of the
target sits in the bank as a *negative* (a false negative). The original (`zscir/deduplicate_images.py`)
compares images pairwise, O(N^2); hashing the decoded pixels groups the same images in one pass.

    python -m datasets_scripts.dedup --dataset fashioniq-hf --split train --output dedup_map.json
    python -m datasets_scripts.dedup --image_dir images/ --output dedup_map.json
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.image_blocks import plan_image_shards, still_valid
from modeling_spn4cir.image_files import (
    BadImageError,
    bad_images_message,
    list_image_files,
    open_image,
)
from modeling_spn4cir.storage import (
    RecordsCodec,
    ShardJob,
    ShardStore,
    atomic_write_json,
    directory_lock,
    sha256,
)

DEDUP_SHARD_SIZE = 4096
HASH_FORMAT = 1


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels and the size: equal for the same picture in any file format."""
    array = np.asarray(image.convert("RGB"))
    return sha256([np.asarray(array.shape, dtype=np.int64).tobytes(), np.ascontiguousarray(array).tobytes()])


def find_duplicate_groups(images: Iterable[tuple[str, Image.Image]], show_progress_bar: bool = True) -> list[list[str]]:
    """Groups (of 2 or more ids, in input order) of images with identical pixels."""
    by_hash: dict[str, list[str]] = {}
    for image_id, image in tqdm(images, desc="Hashing images", disable=not show_progress_bar):
        by_hash.setdefault(pixel_hash(image), []).append(image_id)
    return [ids for ids in by_hash.values() if len(ids) > 1]


def canonical_map(groups: list[list[str]]) -> dict[str, str]:
    """`{duplicate id: canonical id}` — the canonical id of a group is its first member; ids without
    duplicates are absent (they map to themselves)."""
    return {image_id: group[0] for group in groups for image_id in group[1:]}


def _hasher(images, ids: list[str], bar):
    """`build` of a hash shard: the pixel hashes still valid in the shard it replaces (same id, same bytes) are
    kept, the other images are decoded and hashed."""
    def hashes(job: ShardJob) -> list[dict]:
        known = still_valid(job, ids, "pixel_hash")
        records = []
        for image_id, digest in zip(ids[job.plan.start:job.plan.stop], job.plan.inputs["image_digests"]):
            if image_id not in known:
                known[image_id] = pixel_hash(images.images([image_id])[0])
                bar.update(1)
            records.append({"image_id": image_id, "sha256": digest, "pixel_hash": known[image_id]})
        return records

    return hashes


def dedup_map_for(images, image_ids, cache_dir: str | Path | None = None, show_progress_bar: bool = True,
                  shard_size: int = DEDUP_SHARD_SIZE) -> dict[str, str]:
    """`{duplicate id: canonical id}` among `image_ids` (an `ImageStore` holds them): images with identical pixels
    map to the first of them in `image_ids` order, as the original's `optimized_images.json` keeps one name per
    group. Pixel hashes are cached in the shard store `cache_dir` (JSON lines `{image_id, sha256 of the stored
    bytes, pixel_hash}` in shards of `shard_size` images, see `modeling_spn4cir.storage.ShardStore`): a later run
    decodes only images that are new or whose bytes changed, and reads no image byte for a shard whose images'
    files are unchanged. Under `torch.distributed` every rank must call this; the hashing is split over them."""
    ids = list(dict.fromkeys(image_ids))
    if not ids:
        return {}
    images.check(ids, "images to de-duplicate")  # an id the corpus lacks is named, not a bare KeyError
    store = ShardStore(cache_dir, "hashes", RecordsCodec(), "de-duplication hash cache")
    settings = {"format": HASH_FORMAT, "shard_size": shard_size}
    by_hash: dict[str, list[str]] = {}
    # another run sharing the cache waits until this one has read it (it never reads half of another run's shards)
    with directory_lock(cache_dir, "de-duplication hash cache", wait=True) if cache_dir is not None else nullcontext():
        shards = plan_image_shards(store, images, ids, shard_size, settings)
        with tqdm(desc="De-duplication hashes", unit="image", disable=not show_progress_bar) as bar:
            held = store.sync(shards.plans, _hasher(images, ids, bar), shards.manifests, settings)
        for shard in held:
            for record in store.read(shard):
                by_hash.setdefault(record["pixel_hash"], []).append(record["image_id"])
    return canonical_map([group for group in by_hash.values() if len(group) > 1])


def _iter_dataset(path: str, split: str):
    import datasets

    corpus = datasets.load_dataset(path, "corpus", split=split)
    seen = set()
    for row in corpus:
        if row["image_id"] not in seen:  # FashionIQ lists an image once per category
            seen.add(row["image_id"])
            yield row["image_id"], row["image"]


def _iter_folder(folder: Path):
    """The images of a folder by the one folder rule, decoded by the one image rule (as `ImageStore` decodes a
    dataset's images, so that both sources hash the same pixels)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--image_dir {folder} is not a folder; pass the folder of images to compare.")
    listed = list_image_files(folder)
    if listed.unreadable:
        raise BadImageError(bad_images_message(listed.unreadable, "Restore or remove them."))
    for path in listed.files:
        yield str(path.relative_to(folder).with_suffix("")), open_image(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="an HF dataset directory or Hub id in the spn4cir schema")
    source.add_argument("--image_dir", help="a folder of images")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output", help="write {duplicate id: canonical id} JSON here")
    args = add_debug_flag(parser).parse_args(argv)
    images = _iter_dataset(args.dataset, args.split) if args.dataset else _iter_folder(Path(args.image_dir))
    groups = find_duplicate_groups(images)
    for group in groups:
        print(" = ".join(group))
    mapping = canonical_map(groups)
    print(f"{len(groups)} groups of identical images; {len(mapping)} images map to a canonical id.")
    if args.output:
        atomic_write_json(args.output, mapping, indent=1)


if __name__ == "__main__":
    run_cli(main)
