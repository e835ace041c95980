"""The candidate bank of SPN's stage 2: every unique training image encoded once by the frozen towers.

Two tensors per image: the target embedding (`get_target_embeds`, the negatives and positives of the loss)
and the reference features (`get_reference_features`, what the query side consumes). Stored as safetensors
plus a JSON fingerprint of everything that determines them — the frozen towers' weights, the image ids,
the images' bytes, the image processor and the dtype. A stored bank is reused only when the fingerprint
matches; otherwise it is rebuilt and the log says why. (The original reuses any file at `--bank_path`,
even one built by another model.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from datasets_scripts.image_store import ImageStore, encode_images
from modeling_spn4cir.atomic import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

BANK_FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CandidateBank:
    """`image_ids[i]` has target embedding `target_embeds[i]` (`[K, D]`, or `[K, Q, D]` for multi-vector
    families) and reference features `reference_features[i]` (whatever shape the family's
    `get_reference_features` returns per image: `[K, D]`, `[K, T, H]`, ...); `dedup_map` sends duplicate ids to
    their canonical id."""

    image_ids: list[str]
    target_embeds: torch.Tensor
    reference_features: torch.Tensor
    fingerprint: dict
    dedup_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

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


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def frozen_tower_state(model) -> dict[str, torch.Tensor]:
    """Parameters and buffers outside `query_side_parameters()`: what produces the bank."""
    query_side = {id(p) for p in model.query_side_parameters()}
    names = {name for name, p in model.named_parameters() if id(p) in query_side}
    return {k: v for k, v in model.state_dict().items() if k not in names}


def compute_fingerprint(model, image_ids: Sequence[str], images: ImageStore, image_processor, dtype: str) -> dict:
    state = frozen_tower_state(model)
    towers = _sha256(
        name.encode() + str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, t in sorted(state.items())
    )
    processor = image_processor.to_json_string() if hasattr(image_processor, "to_json_string") else repr(image_processor)
    return {
        "format": BANK_FORMAT,
        "model_class": type(model).__name__,
        "frozen_tower_weights": towers,
        "image_ids": _sha256(i.encode() + b"\0" for i in image_ids),
        "image_content": _sha256(hashlib.sha256(images.raw_bytes(i)).digest() for i in image_ids),
        "image_processor": _sha256([processor.encode()]),
        "dtype": dtype,
        "num_images": len(image_ids),
    }


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
) -> CandidateBank:
    """Load the bank from `bank_dir` if its fingerprint matches, else encode `image_ids` with the frozen towers
    (eval mode, no grad, batched, progress bar) and store it there (atomically)."""
    if dtype not in DTYPES:
        raise ValueError(f"bank dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    image_ids = list(image_ids)
    images.check(image_ids, "bank images")
    fingerprint = compute_fingerprint(model, image_ids, images, image_processor, dtype)
    if bank_dir is not None:
        bank_dir = Path(bank_dir)
        meta_path, tensor_path = bank_dir / "bank.json", bank_dir / "bank.safetensors"
        if meta_path.exists() and tensor_path.exists():
            stored = json.loads(meta_path.read_text())
            changed = [k for k in fingerprint if stored.get("fingerprint", {}).get(k) != fingerprint[k]]
            if not changed and stored.get("image_ids") == image_ids:
                tensors = load_file(tensor_path)
                logger.info("Loaded candidate bank of %d images from %s", len(image_ids), bank_dir)
                return CandidateBank(image_ids, tensors["target_embeds"], tensors["reference_features"], fingerprint,
                                     dict(dedup_map or {}))
            logger.warning("Rebuilding the candidate bank in %s: %s changed since it was built.", bank_dir,
                           ", ".join(changed) or "image id order")
    was_training = model.training
    model.eval()
    try:
        target, reference = encode_images(
            model.get_target_embeds_and_reference_features, images, image_ids, image_processor, batch_size,
            num_workers, device=next(model.parameters()).device, dtype=DTYPES[dtype],
            show_progress_bar=show_progress_bar, desc="candidate bank",
        )
    finally:
        model.train(was_training)
    if bank_dir is not None:
        # The fingerprint goes last and the old one first: a crash in between leaves no valid pair behind.
        (bank_dir / "bank.json").unlink(missing_ok=True)
        atomic_write_bytes(bank_dir / "bank.safetensors",
                           save({"target_embeds": target.contiguous(), "reference_features": reference.contiguous()}))
        atomic_write_json(bank_dir / "bank.json", {"fingerprint": fingerprint, "image_ids": image_ids})
    return CandidateBank(image_ids, target, reference, fingerprint, dict(dedup_map or {}))
