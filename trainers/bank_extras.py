"""Unlabeled images as extra negatives of the stage-2 bank (the original's `clip4cir/train_negplus.py`,
`models_negplus.py`): images that are in no training triplet, encoded once by the frozen target side and appended
to the bank's target embeddings, so that stage 2 scores each query against them too. They are negatives only: no
query starts from them (no reference features are stored) and no query has one as its target.

The candidates are the extra corpus's images in their order, each once, minus

- the training triplets' images, by id (after the de-duplication map, so a mapped copy is dropped too); an id
  that is also a training image must name the same bytes in both corpora, else the two share no id scheme and
  "in no triplet" cannot be told by id (an error naming the id);
- beyond `limit`, the rest (`--bank_extra_limit`: the first N candidates);
- after encoding, an image whose stored bytes equal a triplet image's or an earlier extra's (same sha256).

They are stored beside the bank, in the same `bank_dir`, as a [`ShardStore`] of their own (`extra-00000.safetensors`,
..., `extra.json`: target embeddings only), fingerprinted like the bank (target side, ids, bytes, dtype, shard
size): a changed extra set or model rebuilds them, a killed build resumes shard by shard, a stale or foreign shard
is rebuilt, never used, and under `torch.distributed` the ranks share the shards to build.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from modeling_spn4cir.image_blocks import content_sha256, ids_sha256, plan_image_shards
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.storage import SafetensorsCodec, ShardStore

from .candidate_bank import (
    DEFAULT_SHARD_SIZE,
    DTYPES,
    CandidateBank,
    ExtraNegatives,
    bank_dir_lock,
    common_fingerprint,
    eval_mode,
    shard_encoder,
)

logger = logging.getLogger(__name__)
EXTRA_FORMAT = 1


@dataclass
class ExtraImages:
    """Images to append to the stage-2 bank as negatives only: `images` holds them, `image_ids` in the order they
    are taken (`limit`: the first N candidates), `source` names them in logs and errors (`"fashioniq:train"`)."""

    images: ImageStore
    image_ids: list[str]
    source: str
    limit: int | None = None

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--bank_extra_limit must be a positive number of images, got {self.limit}.")
        if not self.image_ids:
            raise ValueError(f"--bank_extra_images {self.source}: the corpus holds no image; pass a split or corpus "
                             "with images in it.")


def check_id_scheme(extra: ExtraImages, train_images: ImageStore, shared: Sequence[str]) -> None:
    """The `shared` ids (in the extra corpus and used by a training triplet) must name the same bytes in both
    stores: same file stamp, else same sha256. Otherwise the two corpora share no id scheme."""
    mine, theirs = extra.images.stamps(shared), train_images.stamps(shared)
    unsure = [i for i, a, b in zip(shared, mine, theirs) if a is None or a != b]
    differ = [i for i, a, b in zip(unsure, extra.images.digests(unsure), train_images.digests(unsure)) if a != b]
    if differ:
        raise ValueError(
            f"--bank_extra_images {extra.source}: image id {differ[0]!r} ({len(differ)} such ids) names other bytes "
            "there than in the training corpus, so the two corpora share no id scheme and which extra images are in "
            "no training triplet cannot be told by id. Give the extra corpus ids of its own (a prefix), or pass a "
            "split of the training dataset."
        )


def extra_candidates(extra: ExtraImages, bank: CandidateBank, train_images: ImageStore
                     ) -> tuple[list[str], dict[str, int]]:
    """The ids to encode (see the module docstring) and how many were dropped, by reason."""
    ids = list(dict.fromkeys(extra.image_ids))
    in_triplets = set(bank.image_ids)
    check_id_scheme(extra, train_images, [i for i in ids if i in train_images and bank.canonical(i) in in_triplets])
    dropped, outside = {"in_triplets": 0, "mapped_copies": 0}, []
    for image_id in ids:
        canonical = bank.canonical(image_id)
        if canonical in in_triplets:
            dropped["in_triplets"] += 1
        elif canonical != image_id:  # a copy of an earlier extra image
            dropped["mapped_copies"] += 1
        else:
            outside.append(image_id)
    if not outside:
        raise ValueError(
            f"--bank_extra_images {extra.source}: all its {len(ids)} images are training triplet images (or mapped "
            "copies of them): none is left to add as a negative. Pass a split or corpus with images outside the "
            "triplets (FashionIQ / CIRR: the train split's corpus holds every image of its split file)."
        )
    kept = outside[:extra.limit] if extra.limit is not None else outside
    dropped["over_limit"] = len(outside) - len(kept)
    return kept, dropped


def add_extra_negatives(bank: CandidateBank, model, extra: ExtraImages, train_images: ImageStore, image_processor,
                        bank_dir: str | Path | None = None, dtype: str = "float32", batch_size: int = 64,
                        show_progress_bar: bool = True, num_workers: int = 0,
                        shard_size: int = DEFAULT_SHARD_SIZE) -> CandidateBank:
    """`bank` with `extra`'s images in no training triplet appended as negatives only (`bank.extra`; the loss
    scores `bank.negatives`, `[K + E, ...]`). The same frozen `model`, image processor and storage options as the
    bank; stored in `bank_dir` beside it (or in memory). Every rank must call this under `torch.distributed`."""
    ids, dropped = extra_candidates(extra, bank, train_images)
    store = ShardStore(bank_dir, "extra", SafetensorsCodec(["target_embeds"], DTYPES[dtype]),
                       "candidate bank's extra negatives")
    common = {**common_fingerprint(model, image_processor, dtype, shard_size), "extra_format": EXTRA_FORMAT}
    with bank_dir_lock(bank_dir):
        shards = plan_image_shards(store, extra.images, ids, shard_size, common)
        fingerprint = {**common, "image_ids": ids_sha256(ids), "image_content": content_sha256(shards.digests),
                       "num_images": len(ids)}
        encode = shard_encoder(model.get_target_embeds, ["target_embeds"], extra.images, ids, image_processor,
                               next(model.parameters()).device, batch_size, num_workers, dtype, show_progress_bar,
                               "extra negatives")
        with eval_mode(model):
            held = store.sync(shards.plans, encode, shards.manifests, fingerprint, {"image_ids": ids})
        target = torch.cat([store.read(s)["target_embeds"] for s in held])
    seen = set(bank.image_digests or ())
    keep = []
    for row, digest in enumerate(shards.digests):  # a copy of a triplet image (or of an earlier extra) by its bytes
        if digest not in seen:
            seen.add(digest)
            keep.append(row)
    dropped["same_bytes"] = len(ids) - len(keep)
    logger.info("Extra negatives from %s: %d images appended to the bank of %d (dropped: %s).", extra.source,
                len(keep), len(bank), dropped)
    negatives = ExtraNegatives([ids[r] for r in keep], target[keep], fingerprint, dropped)
    return replace(bank, extra=negatives)
