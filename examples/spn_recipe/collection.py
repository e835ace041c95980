"""The zero-shot row's data the way real zero-shot data arrives: the unlabeled pool written as an image collection
without annotations (webdataset shards, as CC3M ships), converted with `datasets_scripts.images`, then captioned and
paired like any such corpus (docs/zero_shot.md)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from datasets_scripts.images import build_images
from datasets_scripts.load import load_cir_data
from modeling_spn4cir.image_store import ImageStore

SHARD_IMAGES = 1000  # images per webdataset shard


def write_webdataset(corpus, directory: Path, shard_size: int = SHARD_IMAGES) -> Path:
    """`corpus`'s images as webdataset shards in `directory` (`00000.tar`, ...: one `<image_id>.png` per sample,
    its stored bytes; webdataset's `__key__` is then the image id). Ids must not contain a dot (the key ends at
    the first one)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.tar"):
        stale.unlink()
    images, ids = ImageStore(corpus), list(corpus["image_id"])
    dotted = [i for i in ids if "." in i]
    if dotted:
        raise ValueError(f"webdataset keys end at the first dot: ids {dotted[:3]} would be cut.")
    for shard, start in enumerate(range(0, len(ids), shard_size)):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for image_id in ids[start:start + shard_size]:
                data = images.raw_bytes(image_id)
                info = tarfile.TarInfo(f"{image_id}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return directory


def pool_as_collection(pool, out: Path):
    """The pool written as webdataset shards (OUTPUT_DIR/pool_shards) and converted back into a corpus in the
    project schema (OUTPUT_DIR/pool_corpus, `datasets_scripts.images`); returns that corpus (split `train`). Its
    ids are the pool's (webdataset keys), its images the same bytes, so the pool's caption cache holds them."""
    shards = write_webdataset(pool, out / "pool_shards")
    path = build_images(shards, out / "pool_corpus", overwrite_output_dir=True)
    return load_cir_data(str(path)).corpus["train"]
