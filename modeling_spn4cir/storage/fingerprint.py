"""The fingerprints of model content. The one target-side fingerprint: what decides whether two models give the same target embeddings and reference
features for the same image — the weights outside `query_side_parameters()` (names, shapes, dtypes, bytes) and
the image preprocessing. The candidate bank, the gallery index and the evaluator's bank reuse all compare it, so
an SPN stage-2 model (its target side frozen) keeps the bank and the index of its stage-1 model, and any other
model is refused by all three. And a checkpoint's own fingerprint (`checkpoint_fingerprint`: its weight files' bytes, or
its Hub revision), by which a LoRA adapter names the base it was trained on."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from .hashing import file_sha256, sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Keys of an image processor's dict that name classes rather than change pixels.
PROCESSOR_NAME_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class", "auto_map"})

# model -> (what its target-side tensors are now, their weights' hash)
_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _probe(state: dict[str, torch.Tensor]) -> tuple:
    """What the tensors of `state` are now, cheaply: each one's storage, version, dtype and shape, and 16 of its
    values at fixed positions (a training step changes them even where it bypasses versions: fused optimizers,
    writes through `.data`)."""
    tensors = [t.detach() for _, t in sorted(state.items())]
    samples = [t.reshape(-1)[:: max(1, t.numel() // 16)].double() for t in tensors if t.numel()]
    values = torch.cat([s.cpu() for s in samples]).numpy().tobytes() if samples else b""
    return tuple((t.data_ptr(), t._version, str(t.dtype), tuple(t.shape)) for t in tensors), values


def _weights_sha256(model) -> str:
    """sha256 of `model.target_side_state_dict()` (names, shapes, dtypes, bytes). Hashing reads every target-side
    weight, so it is cached per model object while `_probe` sees the same tensors."""
    state = model.target_side_state_dict()
    probe = _probe(state)
    cached = _WEIGHTS.get(model)
    if cached is not None and cached[0] == probe:
        return cached[1]
    weights = sha256(name.encode() + str((tuple(t.shape), str(t.dtype))).encode() + _tensor_bytes(t)
                     for name, t in sorted(state.items()))
    _WEIGHTS[model] = (probe, weights)
    return weights


def processor_sha256(image_processor) -> str:
    """sha256 of the image processor's settings, without the keys that only name its class."""
    config = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {"repr": repr(image_processor)}
    settings = {k: v for k, v in config.items() if k not in PROCESSOR_NAME_KEYS}
    return sha256(json.dumps(settings, sort_keys=True, default=str).encode())


def target_side_fingerprint(model, image_processor) -> dict[str, str]:
    """`{"model_class", "target_side_weights", "image_processor"}`: the model class, the sha256 of
    `model.target_side_state_dict()` and of the image processor's settings. Two (model, processor) pairs with the
    same fingerprint encode every image to the same target embeddings and reference features. A PEFT model is
    fingerprinted by its base model (stage-2 adapters live on the query side)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"model_class": type(base).__name__, "target_side_weights": _weights_sha256(base),
            "image_processor": processor_sha256(image_processor)}


def same_target_side(fingerprint: dict, model, image_processor) -> bool:
    """Whether `fingerprint` (a bank's, an index's: any dict holding a target-side fingerprint's keys) was made
    by a model and image processor with the target side of these."""
    return all(fingerprint.get(k) == v for k, v in target_side_fingerprint(model, image_processor).items())


def checkpoint_fingerprint(name_or_path: str) -> dict:
    """What a checkpoint is by content: for a local directory `{"weights": {file name: sha256}}` of its weight files
    (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`; a retrained, re-converted or replaced checkpoint has other bytes),
    for a Hub id `{"revision": commit}` of the snapshot in the local cache (None when it cannot be told offline)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        return {"weights": {p.name: file_sha256(p) for p in files}}
    try:
        from transformers.utils import cached_file
        from transformers.utils.hub import extract_commit_hash

        resolved = cached_file(name_or_path, "config.json", local_files_only=True)  # loaded just before
        return {"revision": extract_commit_hash(resolved, None)}
    except (OSError, ValueError):  # offline without a cached copy, a gated repo, ...: the revision cannot be told
        return {"revision": None}
