"""The candidate bank of SPN's stage 2: every unique training image encoded once by the frozen towers.

Two tensors per image: the target embedding (`get_target_embeds`, the negatives and positives of the loss)
and the reference features (`get_reference_features`, what the query side consumes). A stored bank carries a
JSON fingerprint of everything that determines it — the target-side fingerprint (the frozen towers' weights and
dtypes, the image processor: `modeling_spn4cir.storage.target_side_fingerprint`), the image ids, the images'
bytes, the storage dtype and the shard size. A stored bank is reused only when the fingerprint matches; otherwise
it is rebuilt and the log says why. (The original reuses any file at `--bank_path`, even one built by another
model.)

Token-level reference features are large (BLIP4CIR: 577 x 768 per image, 20k images = 17.7 GB in fp16), so a
bank stored in `bank_dir` is a [`ShardStore`] of contiguous blocks of `shard_size` images:

    bank_dir/
        bank-00000.safetensors   {"target_embeds": [n0, ...], "reference_features": [n0, ...]}
        bank-00000.json          the shard's manifest: its fingerprint, rows [start, stop), byte size, sha256
                                 and file stamp, and its images' sha256 under their file stamps
        ...
        bank.json                the bank's fingerprint, image ids and shard list; written last

A killed build resumes shard by shard; a shard's fingerprint covers only its own images, so a changed image
re-encodes the shard that holds it, not the bank. A warm start reads no image byte and hashes no shard (see
`modeling_spn4cir.image_blocks` and the store's stamp rule); a missing, truncated, foreign or unreadable shard and
a malformed `bank.json` or manifest are rebuilt, never a crash, and the log says why.

Under `torch.distributed` every rank calls `load_or_build_candidate_bank`, and the work is split two ways (the
store's two strategies): a stored bank's shards to build are shared round-robin (each rank writes its own, then
every rank maps the whole bank); an in-memory bank is encoded as one block per rank and gathered.

Loaded, the target embeddings are one in-memory tensor (they are small, and the loss keeps them as a buffer);
the reference features of a stored bank stay on disk behind a read-only memory-mapped view ([`ShardedRows`])
that reads the rows a batch asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling_spn4cir.distributed import broadcast_object, world
from modeling_spn4cir.image_blocks import content_sha256, ids_sha256, plan_image_shards
from modeling_spn4cir.image_store import ImageStore, encode_images
from modeling_spn4cir.storage import (
    SafetensorsCodec,
    Shard,
    ShardedRows,
    ShardJob,
    ShardStore,
    directory_lock,
    target_side_fingerprint,
)

BANK_FORMAT = 3  # 3: the target-side fingerprint of modeling_spn4cir.storage, manifests of the shard store
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_SIZE = 1024
KEYS = ("target_embeds", "reference_features")


@dataclass
class ExtraNegatives:
    """Images of no training triplet appended to the bank as negatives only (`trainers.bank_extras`): their ids,
    target embeddings `[E, D]` (or `[E, Q, D]`; no reference features: no query starts from them), the fingerprint
    of their store, and how many candidates the de-duplication against the triplet images dropped, by reason."""

    image_ids: list[str]
    target_embeds: torch.Tensor
    fingerprint: dict
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class CandidateBank:
    """`image_ids[i]` has target embedding `target_embeds[i]` (`[K, D]`, or `[K, Q, D]` for multi-vector
    families) and reference features `reference_features[i]` (whatever shape the family's
    `get_reference_features` returns per image: `[K, D]`, `[K, T, H]`, ...); `dedup_map` sends duplicate ids to
    their canonical id. `reference_features` is an in-memory tensor for a bank built without a directory and a
    memory-mapped [`ShardedRows`] view for a stored one; both give `reference_features[list_of_rows] -> Tensor`."""

    image_ids: list[str]
    target_embeds: torch.Tensor
    reference_features: torch.Tensor | ShardedRows
    fingerprint: dict
    dedup_map: dict[str, str] = field(default_factory=dict)
    image_digests: list[str] | None = None  # sha256 of each image's stored bytes (row order)
    extra: ExtraNegatives | None = None  # negatives only, after the K rows above

    def __post_init__(self):
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def size(self) -> int:
        """K + E: the rows of `negatives`."""
        return len(self) + (len(self.extra.image_ids) if self.extra is not None else 0)

    @property
    def negatives(self) -> torch.Tensor:
        """`[K + E, ...]`: what stage 2 scores each query against, the K triplet images' target embeddings (rows
        `0..K-1`, where `indices` points), then the E extra negatives'."""
        if self.extra is None:
            return self.target_embeds
        return torch.cat([self.target_embeds, self.extra.target_embeds.to(self.target_embeds.dtype)])

    def canonical(self, image_id: str) -> str:
        return self.dedup_map.get(image_id, image_id)

    def indices(self, image_ids: Sequence[str]) -> list[int]:
        try:
            return [self._index[self.canonical(i)] for i in image_ids]
        except KeyError as error:
            raise KeyError(f"image {error.args[0]!r} is not in the candidate bank; was it built from these triplets?") from None


def bank_image_ids(triplet_sets: Iterable, dedup_map: dict[str, str] | None = None) -> list[str]:
    """Unique canonical ids of every reference and target the training triplets use, in first-seen order."""
    dedup_map = dedup_map or {}
    ids: dict[str, None] = {}
    for triplets in triplet_sets:
        for column in ("reference_id", "target_id"):
            for image_id in triplets[column]:
                if image_id is not None:
                    ids.setdefault(dedup_map.get(image_id, image_id))
    return list(ids)


def _store(bank_dir: str | Path | None, dtype: str) -> ShardStore:
    # bank.safetensors: the single-file format of an earlier version
    return ShardStore(bank_dir, "bank", SafetensorsCodec(KEYS, DTYPES[dtype]), "candidate bank",
                      also_remove=("bank.safetensors",))


def _checked(image_ids: Sequence[str], images: ImageStore, dtype: str, shard_size) -> tuple[list[str], int]:
    if dtype not in DTYPES:
        raise ValueError(f"bank dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive number of images, got {shard_size!r}.")
    image_ids = list(image_ids)
    if not image_ids:
        raise ValueError("No images for the candidate bank: the training triplets name none.")
    images.check(image_ids, "bank images")
    return image_ids, int(shard_size)


def common_fingerprint(model, image_processor, dtype: str, shard_size: int) -> dict:
    """The fields every fingerprint of the bank and of its shards holds: the target side (hashed once, on rank 0),
    the storage dtype and the shard size."""
    return broadcast_object({"format": BANK_FORMAT, **target_side_fingerprint(model, image_processor),
                             "dtype": dtype, "shard_size": shard_size} if world()[0] == 0 else None)


def bank_dir_lock(bank_dir: str | Path | None):
    """The lock of a stored bank's directory, held from reading its manifests until the bank is loaded (its target
    embeddings read, its shards mapped): a second run sharing `bank_dir` waits, then reuses the bank or rebuilds it,
    and never loads another run's shards. Nothing for an in-memory bank."""
    return directory_lock(bank_dir, "candidate bank", wait=True) if bank_dir is not None else nullcontext()


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def shard_encoder(encode, keys: Sequence[str], images: ImageStore, image_ids: Sequence[str], image_processor,
                  device, batch_size: int, num_workers: int, dtype: str, show_progress_bar: bool, what: str):
    """`build` of a bank store's shards: a shard's rows encoded by `encode` (`pixel_values -> tensor` or a tuple of
    them, one per key of `keys`), progress on rank 0."""
    def build(job: ShardJob) -> dict[str, torch.Tensor]:
        out = encode_images(encode, images, image_ids[job.plan.start:job.plan.stop], image_processor, batch_size,
                            num_workers, device=device, dtype=DTYPES[dtype],
                            show_progress_bar=show_progress_bar and world()[0] == 0, desc=f"{what} {job.label}".strip())
        return dict(zip(keys, (out,) if isinstance(out, torch.Tensor) else out))

    return build


def _assemble(store: ShardStore, shards: list[Shard], image_ids, fingerprint, dedup_map, digests) -> CandidateBank:
    """The bank of the held shards: in memory, the two tensors; stored, the target embeddings read and the
    reference features memory-mapped."""
    if store.directory is None:
        target, reference = (torch.cat([s.payload[key] for s in shards]) for key in KEYS)
    else:
        target = torch.cat([store.codec.read(s.path, ["target_embeds"])["target_embeds"] for s in shards])
        reference = ShardedRows([s.path for s in shards], [s.manifest["stop"] - s.manifest["start"] for s in shards],
                                "reference_features", shards[0].manifest["reference_features_row_shape"],
                                store.codec.dtype)
    return CandidateBank(image_ids, target, reference, fingerprint, dict(dedup_map or {}), digests)


def load_or_build_candidate_bank(
    model,
    images: ImageStore,
    image_ids: Sequence[str],
    image_processor,
    bank_dir: str | Path | None = None,
    dtype: str = "float32",
    batch_size: int = 64,
    dedup_map: dict[str, str] | None = None,
    show_progress_bar: bool = True,
    num_workers: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> CandidateBank:
    """Encode `image_ids` with the frozen towers (eval mode, no grad, batched, progress bar), or load them.

    Without `bank_dir` the bank is two in-memory tensors. With it, the bank is stored there as shards of
    `shard_size` images (see the module docstring): a bank whose fingerprint matches is loaded (target
    embeddings in memory, reference features memory-mapped), an interrupted or outdated build is resumed,
    encoding only the shards that are missing, corrupt or built from something else.

    Under `torch.distributed`, every rank must call this: the work is split over the ranks (each hashes and
    encodes its share, rank 0 decides what is reused), so W processes build about W times faster and none waits
    idle in a barrier. With a `bank_dir`, the ranks must share its file system.
    """
    image_ids, shard_size = _checked(image_ids, images, dtype, shard_size)
    store = _store(bank_dir, dtype)
    common = common_fingerprint(model, image_processor, dtype, shard_size)
    with bank_dir_lock(bank_dir):
        shards = plan_image_shards(store, images, image_ids, shard_size, common)
        fingerprint = {**common, "image_ids": ids_sha256(image_ids), "image_content": content_sha256(shards.digests),
                       "num_images": len(image_ids)}
        encode = shard_encoder(model.get_target_embeds_and_reference_features, KEYS, images, image_ids,
                               image_processor, next(model.parameters()).device, batch_size, num_workers, dtype,
                               show_progress_bar, "candidate bank")
        with eval_mode(model):
            held = store.sync(shards.plans, encode, shards.manifests, fingerprint, {"image_ids": image_ids})
        return _assemble(store, held, image_ids, fingerprint, dedup_map, shards.digests)
