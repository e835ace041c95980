"""What every family's converter of original checkpoints shares: safe reading, strict key accounting, and
writing the converted directory atomically (and to the Hub).

Converters are not shipped with `trust_remote_code` checkpoints, so they may import this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import atomic_directory


class CheckpointMismatchError(ValueError):
    """A checkpoint key has no place in the model, a model weight has no key, or shapes differ."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """`torch.load(path, weights_only=True)` on the CPU: tensors in plain containers only, never arbitrary objects."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(
            f"Could not read {path} with torch.load(weights_only=True): {error}. Only plain state dicts "
            "(tensors in dicts) are accepted; re-save the checkpoint with torch.save(model.state_dict())."
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a dict (state dict or checkpoint).")
    return data


def check_state_dict(converted: Mapping[str, torch.Tensor], model: torch.nn.Module, what: str = "model") -> dict:
    """Every model key present with its shape, no key left over; returns `converted` in the model's dtypes and
    key order. Errors name the keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]
    extra = [k for k in converted if k not in expected]
    if missing or extra:
        raise CheckpointMismatchError(
            f"Checkpoint does not fit the inferred {what} geometry: missing keys {missing}, unexpected keys {extra}."
        )
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if converted[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointMismatchError("Shape mismatch: " + "; ".join(mismatched))
    return {k: converted[k].to(expected[k].dtype) for k in expected}


def write_converted(model, processor, model_card: str, output_dir: str | os.PathLike,
                    push_to_hub: str | None = None) -> Path:
    """Write `model` (safetensors + config + code), its processor (or image processor) and the model card into
    `output_dir`, which appears complete or not at all; optionally push all three to the Hub repo `push_to_hub`."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(model_card)
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
        from huggingface_hub import upload_file

        upload_file(path_or_fileobj=str(output_dir / "README.md"), path_in_repo="README.md", repo_id=push_to_hub)
    return output_dir
