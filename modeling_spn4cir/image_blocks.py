"""The images behind the row blocks of a shard store (the candidate bank, the caption cache, the de-duplication
hashes, a gallery index's build): each block's ids and their content identity, the sha256 of each image's stored
bytes.

A warm start reads no image byte: a shard's manifest keeps its images' digests (its `inputs`) under the block's
stamp, the ids with each image's file stamp (`ImageStore.stamps`). A block whose stamp is unchanged takes its
digests from there; any other block (a touched, rewritten or new image, a dataset without files) is hashed
again, its hashing split over the `torch.distributed` ranks. So a touched image keeps its shard (same digests,
same fingerprint) and a rewritten one rebuilds it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .distributed import all_gather_object, world
from .image_store import ImageStore
from .storage import ShardJob, ShardPlan, ShardStore, sha256


def ids_sha256(image_ids: Sequence[str]) -> str:
    """sha256 of the ids, in order."""
    return sha256(i.encode() + b"\0" for i in image_ids)


def content_sha256(digests: Sequence[str]) -> str:
    """sha256 of the images' content digests, in order."""
    return sha256(bytes.fromhex(d) for d in digests)


@dataclass
class ImageBlock:
    """The images of one block: `ids`, their `stamp` (None where some image has no file) and `digests`."""

    ids: list[str]
    stamp: str | None
    digests: list[str]

    @property
    def inputs(self) -> dict:
        """What a shard manifest keeps of the block (the digests under the stamp they were read at)."""
        return {"stamp": self.stamp, "image_digests": self.digests}

    def identity(self) -> dict:
        """The block's part of a shard fingerprint: which images, and what their bytes are."""
        return {"image_ids": ids_sha256(self.ids), "image_content": content_sha256(self.digests)}


def _stamp(images: ImageStore, image_ids: Sequence[str]) -> str | None:
    """A cheap key of a block of images (ids + file stamps, no byte read), or None when some image has none."""
    stamps = images.stamps(image_ids)
    if any(s is None for s in stamps):
        return None
    return sha256(f"{i}\0{s}\0".encode() for i, s in zip(image_ids, stamps))


def _block(images: ImageStore, ids: list[str], manifest: dict | None) -> ImageBlock:
    stamp = _stamp(images, ids)
    cached = manifest.get("inputs") if isinstance(manifest, dict) else None
    cached = cached if isinstance(cached, dict) else {}
    digests = cached.get("image_digests")
    if stamp is None or cached.get("stamp") != stamp or not isinstance(digests, list) or len(digests) != len(ids):
        digests = images.digests(ids)
    return ImageBlock(ids, stamp, digests)


def image_blocks(images: ImageStore, image_ids: Sequence[str], blocks: Sequence[tuple[int, int]],
                 manifests: Sequence[dict | None], only: Collection[int] | None = None) -> list[ImageBlock | None]:
    """The [`ImageBlock`] of each row block `[start, stop)` of `image_ids`, given the stored shard `manifests`
    (`ShardStore.manifests`). Under `torch.distributed` every rank must call this: each rank works out its share of
    the blocks, every rank gets them all. `only`: the blocks wanted (the others are None)."""
    rank, world_size = world()
    wanted = [k for k in range(len(blocks)) if only is None or k in only]
    mine = {k: _block(images, list(image_ids[slice(*blocks[k])]), manifests[k]) for k in wanted[rank::world_size]}
    found: dict[int, ImageBlock] = {}
    for part in all_gather_object(mine):
        found.update(part)
    return [found.get(k) for k in range(len(blocks))]


@dataclass
class ImageShards:
    """What a shard store of image rows is asked to hold: its stored `manifests`, the [`ImageBlock`] of each shard
    and each shard's `plans` (None where not wanted)."""

    manifests: list[dict | None]
    blocks: list[ImageBlock | None]
    plans: list[ShardPlan | None]

    @property
    def digests(self) -> list[str]:
        """Every image's content digest, in row order (all blocks wanted)."""
        return [d for block in self.blocks for d in block.digests]


def plan_image_shards(store: ShardStore, images: ImageStore, image_ids: Sequence[str], shard_size: int,
                      settings: dict, only: Collection[int] | None = None) -> ImageShards:
    """The shards of `store` over the images `image_ids` (in blocks of `shard_size` in a directory, one block per
    rank in memory): each shard's fingerprint is `settings`, its position and its images' ids and bytes; its
    manifest keeps the images' digests under their stamps. Every rank must call this."""
    ranges = store.blocks(len(image_ids), shard_size)
    manifests = store.manifests(len(ranges))
    blocks = image_blocks(images, image_ids, ranges, manifests, only)
    plans = [None if block is None else ShardPlan(a, b, {**settings, "shard": k, **block.identity()}, block.inputs)
             for k, ((a, b), block) in enumerate(zip(ranges, blocks))]
    return ImageShards(manifests, blocks, plans)


def still_valid(job: ShardJob, image_ids: Sequence[str], key: str) -> dict[str, object]:
    """`{image_id: record[key]}` of the records of the shard `job` replaces whose image id and bytes (sha256) are
    those of an image of the new shard: what a builder need not compute again."""
    wanted = set(zip(image_ids[job.plan.start:job.plan.stop], job.plan.inputs["image_digests"]))
    return {r["image_id"]: r.get(key) for r in job.previous() or []
            if (r.get("image_id"), r.get("sha256")) in wanted and r.get(key) is not None}
