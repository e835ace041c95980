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

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir spn4cir-tgcir-fiq \
        --tokenizer openai/clip-vit-base-patch16
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..conversion_utils import (
    CheckpointMismatchError,
    allow_nonfinite_weights,
    check_state_dict,
    converter_parser,
    load_checkpoint,
    write_converted,
)
from ..conversion_utils import parse_num_heads as _parse_num_heads
from .configuration_tgcir import TGCIRConfig
from .modeling_tgcir import TGCIRModel

CLIP_PREFIX = "backbone.clip."
DUPLICATE_PREFIX = "backbone.image_backbone."
# OpenAI CLIP keys with no counterpart on purpose: `logit_scale` (CLIP's pre-training temperature, unused by
# TG-CIR) and the metadata that `clip.model.build_model` deletes.
IGNORED_CLIP_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")
TOWERS = ("text", "vision")
DEFAULT_STAGE1_LOGIT_SCALE = 10.0

_TRANSFORMER_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
}
_CLIP_DIRECT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# OpenAI stores projections as `x @ P` ([in, out]); nn.Linear stores `[out, in]`.
_CLIP_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
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


def parse_num_heads(values) -> dict[str, int]:
    """`--num_heads` values for this family's towers {TOWERS}: see `conversion_utils.parse_num_heads`."""
    return _parse_num_heads(values, TOWERS)


def _count_blocks(state: Mapping, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


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
    width = state[f"{c}ln_final.weight"].shape[0]
    vocab_size = state[f"{c}token_embedding.weight"].shape[0]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": state[f"{c}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state, f"{c}transformer.resblocks."),
        "num_attention_heads": _heads(width, "text", num_heads),
        "max_position_embeddings": state[f"{c}positional_embedding"].shape[0],
        "projection_dim": embed_dim,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "pad_token_id": 0,  # OpenAI's tokenizer pads with 0
        "bos_token_id": vocab_size - 2,
        # eos_token_id == 2 makes transformers pool at argmax(input_ids): OpenAI CLIP's rule (EOT is the highest
        # id of every row), what TG-CIR's `extract_text_fea` does.
        "eos_token_id": 2,
    }
    vision_width = state[f"{c}visual.conv1.weight"].shape[0]
    patch_size = state[f"{c}visual.conv1.weight"].shape[-1]
    grid = round((state[f"{c}visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": state[f"{c}visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state, f"{c}visual.transformer.resblocks."),
        "num_attention_heads": _heads(vision_width, "vision", num_heads),
        "image_size": patch_size * grid,
        "patch_size": patch_size,
        "projection_dim": embed_dim,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
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
        num_local_tokens=_count_blocks(state, "backbone.tokenlearn.tokenizers."),
        temperature=temperature,
    )


def _map_clip_key(key: str) -> str | None:
    if key in _CLIP_DIRECT:
        return _CLIP_DIRECT[key]
    if key in _CLIP_TRANSPOSED:
        return _CLIP_TRANSPOSED[key]
    for src_prefix, dst_prefix in (
        ("transformer.resblocks.", "text_model.encoder.layers."),
        ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ):
        m = re.fullmatch(re.escape(src_prefix) + r"(\d+)\.(.+)", key)
        if m and m.group(2) in _TRANSFORMER_BLOCK:
            return f"{dst_prefix}{m.group(1)}.{_TRANSFORMER_BLOCK[m.group(2)]}"
    return None


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
            clip_key = key[len(CLIP_PREFIX):]
            if clip_key in IGNORED_CLIP_KEYS:
                continue
            m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", clip_key)
            if m:
                tower = "vision_model" if m.group(1) else "text_model"
                prefix = f"{tower}.encoder.layers.{m.group(2)}.self_attn"
                # nn.MultiheadAttention packs q, k, v along the output dimension.
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}.{name}.{m.group(3)}"] = chunk.clone()
                continue
            target = _map_clip_key(clip_key)
            if target is None:
                unmapped.append(key)
            else:
                converted[target] = value.t().contiguous() if clip_key in _CLIP_TRANSPOSED else value
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


def convert_original_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: str | None = None,
    push_to_hub: str | None = None,
    num_heads: Iterable[str] | Mapping[str, int] | None = None,
    image_size: int | None = None,
    temperature: float = 0.02,
    overwrite_output_dir: bool = False,
) -> Path:
    """Convert and write `output_dir` (model.safetensors, config, code, image processor, tokenizer if given, model
    card); the directory appears complete or not at all. Returns its path."""
    from ..clip4cir.image_processing_clip4cir import CLIP4CIRImageProcessor

    model, original = load_original_model(checkpoint, num_heads, temperature)
    resolution = model.config.image_size
    if image_size is not None and image_size != resolution:
        raise ValueError(
            f"--image_size {image_size} differs from the checkpoint's resolution {resolution} (fixed by its "
            "position embeddings); drop --image_size or pass the matching value."
        )
    # SPN4CIR's TG-CIR preprocesses with `clip.load`'s transform (CIRPlus sets preprocess = backbone.preprocess):
    # bicubic resize of the short side, center crop, CLIP mean/std.
    image_processor = CLIP4CIRImageProcessor(preprocessing="resize", size=resolution)
    processor = image_processor
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from .processing_tgcir import TGCIRProcessor

        tok = AutoTokenizer.from_pretrained(tokenizer)
        tok.model_max_length = model.config.text_config.max_position_embeddings
        processor = TGCIRProcessor(image_processor=image_processor, tokenizer=tok)
    card = _model_card(model, original, Path(checkpoint).name, tokenizer)
    return write_converted(model, processor, card, output_dir, push_to_hub,
                           overwrite=overwrite_output_dir, protect=[checkpoint])


def _model_card(model: TGCIRModel, original: OriginalCheckpoint, checkpoint_name: str, tokenizer) -> str:
    config = model.config
    copies = ("text token learner / masks copied from the image side (`load_ckpt(..., is_origin=True)`)"
              if original.source_format == "tgcir_stage1" else "own text token learner / masks")
    return f"""---
library_name: transformers
tags: [composed-image-retrieval, spn4cir, tgcir]
---
# TG-CIR converted from `{checkpoint_name}`

Converted with `python -m modeling_spn4cir.convert_original_checkpoint` from the original
`{original.source_format}` format{f" (epoch {original.epoch})" if original.epoch is not None else ""}; {copies}.

| field | value |
|---|---|
| image tower | CLIP ViT patch={config.vision_config.patch_size} layers={config.vision_config.num_hidden_layers} width={config.vision_config.hidden_size} heads={config.vision_config.num_attention_heads}, {config.image_size} px |
| text tower | width={config.text_config.hidden_size} layers={config.text_config.num_hidden_layers} heads={config.text_config.num_attention_heads}, context {config.text_config.max_position_embeddings} |
| tokens | P={config.num_global_tokens} global + Q={config.num_local_tokens} local, D={config.projection_dim} |
| temperature | {config.temperature} |
| tokenizer | {tokenizer or "not included"} |
| preprocessing | CLIP: bicubic resize, center crop, CLIP mean/std |

```python
import modeling_spn4cir  # or pass trust_remote_code=True
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("<this repo>")
```
Text is pooled at the highest token id of each row (OpenAI CLIP's EOT rule) and encoded without a padding mask,
padded to {config.text_config.max_position_embeddings} tokens as the original `clip.tokenize`.
"""


def main(argv=None):
    parser = converter_parser(__doc__, "SPN4CIR TG-CIR best.pt or TG-CIR stage-1 .pt",
                              "tokenizer to save with the model, e.g. openai/clip-vit-base-patch16", TOWERS,
                              "stage-2 tau stored in the config (paper: 0.02 FashionIQ, 0.01 CIRR)")
    parser.set_defaults(temperature=0.02)
    args = parser.parse_args(argv)
    with allow_nonfinite_weights(args.allow_nonfinite_weights):
        out = convert_original_checkpoint(args.checkpoint, args.output_dir, tokenizer=args.tokenizer,
                                          push_to_hub=args.push_to_hub, num_heads=args.num_heads,
                                          temperature=args.temperature, image_size=args.image_size,
                                          overwrite_output_dir=args.overwrite_output_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
