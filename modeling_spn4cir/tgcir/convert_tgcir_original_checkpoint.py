"""Convert original TG-CIR checkpoints (SPN4CIR stage 2 and TG-CIR stage 1) into a TG-CIR directory.

Reads, with `torch.load(..., weights_only=True)` only (no arbitrary unpickling):
- SPN4CIR stage 2 (`best.pt` of `tgcir/train.py`): `{"epoch", "state_dict": CIRPlus.state_dict()}` with the
  text-side copies `backbone.tokenlearn_text.*`, `backbone.masks_text.weight`;
- TG-CIR stage 1 (`*_stage1.pt`, `{"state_dict": VCG_CIR.state_dict()}`): no text-side copies, plus `loss_T`;
  the text side gets copies of the image token learner and masks, exactly as SPN4CIR's
  `CIRPlus.load_ckpt(path, is_origin=True)` does. Other top-level keys are ignored; only `state_dict` is read.

Every key is mapped explicitly: `backbone.clip.*` (OpenAI CLIP) onto transformers' CLIP names,
`backbone.image_backbone.*` (the same tensors again: `image_backbone = clip.visual`) is checked equal to
`backbone.clip.visual.*` and dropped, `backbone.clip.logit_scale` (unused) is dropped; anything unmapped, missing
or mis-shaped is an error naming the key. A stage-2 checkpoint has no `loss_T` (the stage-1 logit scale): it is
set to its initial value 10.0.

Geometry (widths, layers, vocabulary, positions, patch size, P, Q, D) comes from the weights; attention heads,
which the weights do not determine, default to OpenAI's `width // 64` per tower; override with
`--num_heads text=N` / `--num_heads vision=N`.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir spn4cir-tgcir-fiq \\
        --tokenizer openai/clip-vit-base-patch16
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import run_cli
from ..conversion_utils import (CheckpointMismatchError, check_image_size, check_state_dict, conversion_card,
                                converter_parser, count_blocks, load_checkpoint, run_converter, write_converted)
from ..conversion_utils import parse_num_heads as _parse_num_heads
from ..openai_clip_conversion import (convert_openai_clip_entry, openai_clip_backbone, openai_clip_text_config,
                                      openai_clip_vit_config)
from . import SPEC
from .configuration_tgcir import TGCIRConfig
from .modeling_tgcir import TGCIRModel

CLIP_PREFIX = "backbone.clip."
DUPLICATE_PREFIX = "backbone.image_backbone."
TOWERS = ("text", "vision")
DEFAULT_STAGE1_LOGIT_SCALE = 10.0

# TG-CIR modules: original key prefix -> model prefix.
_TGCIR_PREFIXES = {
    "backbone.fc.": "fc.",
    "backbone.text_fc.": "text_fc.",
    "backbone.tokenlearn.": "tokenlearn.",
    "backbone.tokenlearn_text.": "tokenlearn_text.",
    "backbone.masks.": "masks.",
    "backbone.masks_text.": "masks_text.",
    "s_remain_map.": "s_remain_map.",
    "t_remain_map.": "t_remain_map.",
    "t_replace_map.": "t_replace_map.",
}
_TGCIR_DIRECT = {"local_weight": "local_weight", "loss_T": "stage1_logit_scale"}
TEXT_COPY_PREFIXES = ("backbone.tokenlearn_text.", "backbone.masks_text.")


@dataclass
class OriginalCheckpoint:
    """The state dict of an original TG-CIR checkpoint and what was read about it."""

    state_dict: dict[str, torch.Tensor]
    source_format: str  # "spn4cir_stage2" | "tgcir_stage1"
    epoch: int | None = None


def read_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Read an original TG-CIR checkpoint; the format is told by the text-side copies (stage 2 only)."""
    data = load_checkpoint(path)
    if not isinstance(data.get("state_dict"), Mapping):
        raise ValueError(  # noqa: TRY004  (a file in the wrong format, not a wrong argument type)
            f"{path}: expected {{'state_dict': ...}} (SPN4CIR best.pt or TG-CIR stage-1 checkpoint), got top-level "
            f"keys {sorted(map(str, data))[:10]}."
        )
    state = dict(data["state_dict"])
    if not any(k.startswith(CLIP_PREFIX) for k in state):
        raise CheckpointMismatchError(f"{path}: no '{CLIP_PREFIX}*' key: this is not a TG-CIR checkpoint.")
    has_copies = any(k.startswith(TEXT_COPY_PREFIXES) for k in state)
    epoch = data.get("epoch") if isinstance(data.get("epoch"), int) else None
    return OriginalCheckpoint(state, "spn4cir_stage2" if has_copies else "tgcir_stage1", epoch)


def backbone(original: OriginalCheckpoint) -> str:
    """The CLIP image tower of the checkpoint by its weights (`"ViT-B/16 224px"`): the model zoo's identity of a
    checkpoint, whatever its path."""
    return openai_clip_backbone(original.state_dict, CLIP_PREFIX)


def parse_num_heads(values) -> dict[str, int]:
    """`--num_heads` values for this family's towers {TOWERS}: see `conversion_utils.parse_num_heads`."""
    return _parse_num_heads(values, TOWERS)


def _require(state: Mapping, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointMismatchError(f"Missing keys {missing}: cannot infer the TG-CIR geometry.")


def _heads(width: int, tower: str, num_heads: Mapping[str, int]) -> int:
    heads = num_heads.get(tower, max(width // 64, 1))
    if width % heads:
        raise CheckpointMismatchError(
            f"{tower} width {width} is not a multiple of {heads} attention heads; pass --num_heads {tower}=N."
        )
    return heads


def infer_config(
    state: Mapping[str, torch.Tensor], num_heads: Mapping[str, int] | None = None, temperature: float = 0.02
) -> TGCIRConfig:
    """TG-CIR geometry from an original state dict (`backbone.clip.*` as OpenAI's `build_model`, P from the
    masks, Q from the token learner, D from the text projection)."""
    num_heads = dict(num_heads or {})
    c = CLIP_PREFIX
    _require(state, [f"{c}text_projection", f"{c}token_embedding.weight", f"{c}positional_embedding",
                     f"{c}ln_final.weight", f"{c}transformer.resblocks.0.mlp.c_fc.weight", f"{c}visual.proj",
                     f"{c}visual.conv1.weight", f"{c}visual.positional_embedding",
                     f"{c}visual.transformer.resblocks.0.mlp.c_fc.weight", "backbone.masks.weight",
                     "backbone.tokenlearn.tokenizers.0.conv.0.weight"])
    if f"{c}visual.attnpool.positional_embedding" in state:
        raise CheckpointMismatchError("TG-CIR is defined on CLIP ViT towers; this checkpoint has a ModifiedResNet.")
    embed_dim = state[f"{c}text_projection"].shape[1]
    text_heads = _heads(state[f"{c}ln_final.weight"].shape[0], "text", num_heads)
    vision_heads = _heads(state[f"{c}visual.conv1.weight"].shape[0], "vision", num_heads)
    text_config = openai_clip_text_config(state, c, text_heads)
    vision_config = openai_clip_vit_config(state, c, vision_heads)
    num_global, mask_dim = state["backbone.masks.weight"].shape
    if mask_dim != embed_dim or state[f"{c}visual.proj"].shape[1] != embed_dim:
        raise CheckpointMismatchError(
            f"backbone.masks.weight {tuple(state['backbone.masks.weight'].shape)} / backbone.clip.visual.proj "
            f"{tuple(state[f'{c}visual.proj'].shape)} do not match the joint dimension {embed_dim} of "
            "backbone.clip.text_projection."
        )
    return TGCIRConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        num_global_tokens=num_global,
        num_local_tokens=count_blocks(state, "backbone.tokenlearn.tokenizers."),
        temperature=temperature,
    )


def add_text_side_copies(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage-1 state dict with `backbone.tokenlearn_text.*` / `backbone.masks_text.*` copied from the image
    side, as `CIRPlus.load_ckpt(path, is_origin=True)` (a stage-2 state dict is returned unchanged)."""
    state = dict(state)
    if any(k.startswith(TEXT_COPY_PREFIXES) for k in state):
        return state
    for key in list(state):
        for image_prefix, text_prefix in (("backbone.tokenlearn.", "backbone.tokenlearn_text."),
                                          ("backbone.masks.", "backbone.masks_text.")):
            if key.startswith(image_prefix):
                state[text_prefix + key[len(image_prefix):]] = state[key].clone()
    return state


def convert_state_dict(state: Mapping[str, torch.Tensor], model: TGCIRModel) -> dict[str, torch.Tensor]:
    """Map an original TG-CIR state dict (with text-side copies) onto `model`'s keys; every key accounted for."""
    converted, unmapped, mismatched_duplicates = {}, [], []
    for key, value in state.items():
        if key.startswith(DUPLICATE_PREFIX):
            twin = CLIP_PREFIX + "visual." + key[len(DUPLICATE_PREFIX):]
            if twin not in state:
                unmapped.append(key)
            elif not torch.equal(value, state[twin]):
                mismatched_duplicates.append(key)
            continue
        if key.startswith(CLIP_PREFIX):
            mapped = convert_openai_clip_entry(key[len(CLIP_PREFIX):], value)
            if mapped is None:
                unmapped.append(key)
            else:
                converted.update(mapped)
            continue
        if key in _TGCIR_DIRECT:
            converted[_TGCIR_DIRECT[key]] = value.reshape(-1) if key == "loss_T" else value
            continue
        for src_prefix, dst_prefix in _TGCIR_PREFIXES.items():
            if key.startswith(src_prefix):
                converted[dst_prefix + key[len(src_prefix):]] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointMismatchError(f"Unmapped checkpoint keys ({len(unmapped)}): {unmapped}")
    if mismatched_duplicates:
        raise CheckpointMismatchError(
            f"{DUPLICATE_PREFIX}* must equal {CLIP_PREFIX}visual.* (the same module); these differ: "
            f"{mismatched_duplicates}"
        )
    converted.setdefault("stage1_logit_scale", torch.tensor([DEFAULT_STAGE1_LOGIT_SCALE]))  # stage 2 has no loss_T
    return check_state_dict(converted, model, "TG-CIR")


def load_original_model(
    checkpoint: str | os.PathLike,
    num_heads: Iterable[str] | Mapping[str, int] | None = None,
    temperature: float = 0.02,
) -> tuple[TGCIRModel, OriginalCheckpoint]:
    """Build a [`TGCIRModel`] (eval mode) with the weights of an original checkpoint (either format).

    `num_heads`: `{"text": N, "vision": M}` or `["text=N", ...]`; default `width // 64` per tower."""
    original = read_original_checkpoint(checkpoint)
    state = add_text_side_copies(original.state_dict)
    config = infer_config(state, parse_num_heads(num_heads), temperature=temperature)
    model = TGCIRModel(config)
    model.load_state_dict(convert_state_dict(state, model), strict=True)
    return model.eval(), original


def convert_original_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                                tokenizer: str | None = None, push_to_hub: str | None = None,
                                num_heads: Iterable[str] | Mapping[str, int] | None = None,
                                image_size: int | None = None, temperature: float = 0.02,
                                overwrite_output_dir: bool = False) -> Path:
    """Convert and write `output_dir` (model.safetensors, config, code, image processor, tokenizer if given, model
    card); the directory appears complete or not at all. Returns its path.

    SPN4CIR's TG-CIR preprocesses with `clip.load`'s transform (CIRPlus sets preprocess = backbone.preprocess): bicubic
    resize of the short side, center crop, CLIP mean/std (`SPEC.preprocessing`)."""
    model, original = load_original_model(checkpoint, num_heads, temperature)
    check_image_size(model, image_size)
    processor = SPEC.build_processor(model.config, SPEC.load_tokenizer(tokenizer) if tokenizer else None)
    return write_converted(model, processor, _model_card(model, original, checkpoint, tokenizer), output_dir,
                           push_to_hub, overwrite=overwrite_output_dir, protect=[checkpoint])


def _model_card(model: TGCIRModel, original: OriginalCheckpoint, checkpoint, tokenizer) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    copies = ("text token learner / masks copied from the image side (`load_ckpt(..., is_origin=True)`)"
              if original.source_format == "tgcir_stage1" else "own text token learner / masks")
    rows = [("image tower", f"CLIP ViT patch={vision.patch_size} layers={vision.num_hidden_layers} "
                            f"width={vision.hidden_size} heads={vision.num_attention_heads}, {config.image_size} px"),
            ("text tower", f"width={text.hidden_size} layers={text.num_hidden_layers} "
                           f"heads={text.num_attention_heads}, context {text.max_position_embeddings}"),
            ("tokens", f"P={config.num_global_tokens} global + Q={config.num_local_tokens} local, "
                       f"D={config.projection_dim}"),
            ("temperature", config.temperature), ("tokenizer", tokenizer or "not included"),
            ("preprocessing", "CLIP: bicubic resize, center crop, CLIP mean/std")]
    note = ("Text is pooled at the highest token id of each row (OpenAI CLIP's EOT rule) and encoded without a padding "
            f"mask, padded to {text.max_position_embeddings} tokens as the original `clip.tokenize`.")
    return conversion_card(SPEC.title, [SPEC.name], checkpoint, original, rows, copies, note)


def main(argv=None):
    parser = converter_parser(__doc__, "SPN4CIR TG-CIR best.pt or TG-CIR stage-1 .pt",
                              "tokenizer to save with the model, e.g. openai/clip-vit-base-patch16", TOWERS,
                              "stage-2 tau stored in the config (paper: 0.02 FashionIQ, 0.01 CIRR)")
    parser.set_defaults(temperature=0.02)
    run_converter(parser, convert_original_checkpoint, argv)


if __name__ == "__main__":
    run_cli(main)
