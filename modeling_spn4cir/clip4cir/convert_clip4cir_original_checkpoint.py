"""Convert original SPN4CIR / CLIP4Cir checkpoints (OpenAI `clip` state dicts) into a CLIP4CIR directory.

Reads, with `torch.load(..., weights_only=True)` only (no arbitrary unpickling):
- SPN4CIR stage 2 (`best.pt`): `{"epoch", "state_dict": {"clip.<openai key>": tensor}}`;
- CLIP4Cir stage 1: `{"epoch", "CLIP": {<openai key>: tensor}}`;
- a bare OpenAI CLIP state dict;
- optionally CLIP4Cir's Combiner `{"epoch", "Combiner": state_dict}` -> `fusion="combiner"`.

The geometry is inferred from the state dict the way OpenAI's `clip.model.build_model` does, every key is
mapped explicitly, and any unmapped, missing or mis-shaped key is an error that names it.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir spn4cir-clip4cir-fiq \
        --tokenizer openai/clip-vit-base-patch32
"""

import os
import re
from dataclasses import dataclass, field
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
from .configuration_clip4cir import CLIP4CIRConfig
from .image_processing_clip4cir import CLIP4CIRImageProcessor
from .modeling_clip4cir import CLIP4CIRModel

# Keys of OpenAI checkpoints with no counterpart on purpose: `logit_scale` is CLIP's pre-training
# temperature (CIR uses `config.temperature`); the other three are metadata that `build_model` deletes.
IGNORED_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")

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
_DIRECT = {
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
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


@dataclass
class OriginalCheckpoint:
    """An OpenAI-CLIP state dict pulled out of one of the original on-disk formats."""

    clip_state_dict: dict[str, torch.Tensor]
    source_format: str  # "spn4cir_stage2" | "clip4cir_stage1" | "openai_clip"
    epoch: int | None = None
    extra: dict = field(default_factory=dict)


def read_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Detect the format of an original CLIP checkpoint and return its OpenAI-CLIP state dict."""
    data = load_checkpoint(path)
    epoch = data.get("epoch") if isinstance(data.get("epoch"), int) else None
    if "state_dict" in data:
        state = data["state_dict"]
        foreign = [k for k in state if not k.startswith("clip.")]
        if foreign:
            raise CheckpointMismatchError(
                f"{path}: SPN4CIR state_dict keys outside 'clip.' cannot be mapped to CLIP4CIR: {foreign[:10]}"
                f"{' ...' if len(foreign) > 10 else ''} ({len(foreign)} keys)."
            )
        return OriginalCheckpoint({k[len("clip.") :]: v for k, v in state.items()}, "spn4cir_stage2", epoch)
    if "CLIP" in data:
        return OriginalCheckpoint(dict(data["CLIP"]), "clip4cir_stage1", epoch)
    if "Combiner" in data:
        raise ValueError(f"{path} is a Combiner checkpoint; pass it as --combiner_checkpoint.")
    if "token_embedding.weight" in data:
        return OriginalCheckpoint(dict(data), "openai_clip", None)
    raise ValueError(
        f"{path}: unknown checkpoint format (top-level keys {sorted(data)[:10]}); expected 'state_dict' "
        "(SPN4CIR), 'CLIP' (CLIP4Cir) or a bare OpenAI CLIP state dict."
    )


def read_combiner_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    data = load_checkpoint(path)
    if "Combiner" not in data:
        raise ValueError(f"{path}: expected CLIP4Cir's {{'epoch', 'Combiner': state_dict}} format.")
    return dict(data["Combiner"])


def _count_blocks(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def infer_config(
    state: dict[str, torch.Tensor], combiner_state: dict[str, torch.Tensor] | None = None, temperature: float = 0.02
) -> CLIP4CIRConfig:
    """Geometry from an OpenAI CLIP state dict, following `clip.model.build_model`."""
    for key in ("text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight"):
        if key not in state:
            raise CheckpointMismatchError(f"Missing key {key!r}: this is not an OpenAI CLIP state dict.")
    embed_dim = state["text_projection"].shape[1]
    width = state["ln_final.weight"].shape[0]
    vocab_size = state["token_embedding.weight"].shape[0]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state, "transformer.resblocks."),
        "num_attention_heads": width // 64,
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "projection_dim": embed_dim,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "pad_token_id": 0,  # OpenAI's tokenizer pads with 0
        "bos_token_id": vocab_size - 2,
        # eos_token_id == 2 makes transformers pool at argmax(input_ids): OpenAI CLIP's rule (EOT is the
        # highest id of every row), which the original checkpoints were trained with.
        "eos_token_id": 2,
    }
    if "visual.proj" in state:
        vision_width = state["visual.conv1.weight"].shape[0]
        patch_size = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_config = {
            "model_type": "clip_vision_model",
            "hidden_size": vision_width,
            "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _count_blocks(state, "visual.transformer.resblocks."),
            "num_attention_heads": vision_width // 64,
            "image_size": patch_size * grid,
            "patch_size": patch_size,
            "projection_dim": embed_dim,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }
    elif "visual.attnpool.positional_embedding" in state:
        vision_width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_config = {
            "model_type": "clip4cir_resnet",
            "layers": [_count_blocks(state, f"visual.layer{b}.") for b in (1, 2, 3, 4)],
            "width": vision_width,
            "image_size": grid * 32,
            "num_attention_heads": vision_width * 32 // 64,
            "projection_dim": embed_dim,
        }
    else:
        raise CheckpointMismatchError(
            "Neither 'visual.proj' (ViT) nor 'visual.attnpool.positional_embedding' (ModifiedResNet) found."
        )
    combiner = {}
    if combiner_state is not None:
        feature_dim = combiner_state["text_projection_layer.weight"].shape[1]
        if feature_dim != embed_dim:
            raise CheckpointMismatchError(
                f"Combiner feature dim {feature_dim} != CLIP embed dim {embed_dim}: the Combiner was trained "
                "for another CLIP model."
            )
        combiner = {
            "fusion": "combiner",
            "combiner_projection_dim": combiner_state["text_projection_layer.weight"].shape[0],
            "combiner_hidden_dim": combiner_state["combiner_layer.weight"].shape[0],
        }
    return CLIP4CIRConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        temperature=temperature,
        **combiner,
    )


def _map_key(key: str, vision_tower: str) -> str | None:
    """OpenAI key -> CLIP4CIR key (for non-attention-in-proj keys); None when unknown."""
    # The ModifiedResNet keeps OpenAI's names (its stem also has a `visual.conv1`).
    if vision_tower == "resnet" and re.match(r"visual\.(conv[123]|bn[123]|layer\d+|attnpool)\.", key):
        return "vision_model." + key[len("visual.") :]
    if key in _DIRECT:
        return _DIRECT[key]
    if key in _TRANSPOSED:
        return _TRANSPOSED[key]
    for src_prefix, dst_prefix in (
        ("transformer.resblocks.", "text_model.encoder.layers."),
        ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ):
        m = re.fullmatch(re.escape(src_prefix) + r"(\d+)\.(.+)", key)
        if m and m.group(2) in _TRANSFORMER_BLOCK:
            return f"{dst_prefix}{m.group(1)}.{_TRANSFORMER_BLOCK[m.group(2)]}"
    return None


def convert_state_dict(
    state: dict[str, torch.Tensor],
    model: CLIP4CIRModel,
    combiner_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Map an OpenAI CLIP (+ Combiner) state dict onto `model`'s keys; every key must be accounted for."""
    converted, unmapped = {}, []
    for key, value in state.items():
        if key in IGNORED_KEYS:
            continue
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}.self_attn"
            # nn.MultiheadAttention packs q, k, v along the output dimension.
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}.{name}.{m.group(3)}"] = chunk.clone()
            continue
        target = _map_key(key, model.config.vision_tower)
        if target is None:
            unmapped.append(key)
            continue
        converted[target] = value.t().contiguous() if key in _TRANSPOSED else value
    for key, value in (combiner_state or {}).items():
        converted[f"combiner.{key}"] = value
    if unmapped:
        raise CheckpointMismatchError(f"Unmapped checkpoint keys ({len(unmapped)}): {unmapped}")

    return check_state_dict(converted, model, "CLIP4CIR")


def load_original_model(
    checkpoint: str | os.PathLike,
    combiner_checkpoint: str | os.PathLike | None = None,
    temperature: float = 0.02,
) -> tuple[CLIP4CIRModel, OriginalCheckpoint]:
    """Build a [`CLIP4CIRModel`] (eval mode) with the weights of an original checkpoint."""
    original = read_original_checkpoint(checkpoint)
    combiner_state = read_combiner_checkpoint(combiner_checkpoint) if combiner_checkpoint else None
    config = infer_config(original.clip_state_dict, combiner_state, temperature=temperature)
    model = CLIP4CIRModel(config)
    model.load_state_dict(convert_state_dict(original.clip_state_dict, model, combiner_state), strict=True)
    return model.eval(), original


def convert_original_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    combiner_checkpoint: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    image_size: int | None = None,
    temperature: float = 0.02,
    push_to_hub: str | None = None,
    overwrite_output_dir: bool = False,
) -> Path:
    """Convert and write `output_dir` (model.safetensors, config, code, image processor, tokenizer if given,
    model card); the directory appears complete or not at all. Returns its path."""
    model, original = load_original_model(checkpoint, combiner_checkpoint, temperature)
    resolution = model.config.image_size
    if image_size is not None and image_size != resolution:
        raise ValueError(
            f"--image_size {image_size} differs from the checkpoint's resolution {resolution} (fixed by its "
            "position embeddings); drop --image_size or pass the matching value."
        )
    image_processor = CLIP4CIRImageProcessor(preprocessing="targetpad", target_ratio=1.25, size=resolution)
    processor = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from .processing_clip4cir import CLIP4CIRProcessor

        tok = AutoTokenizer.from_pretrained(tokenizer)
        tok.model_max_length = model.config.text_config.max_position_embeddings
        processor = CLIP4CIRProcessor(image_processor=image_processor, tokenizer=tok)

    card = _model_card(model, original, Path(checkpoint).name, combiner_checkpoint, tokenizer)
    return write_converted(model, processor or image_processor, card, output_dir, push_to_hub,
                           overwrite=overwrite_output_dir, protect=[checkpoint, combiner_checkpoint])


def _model_card(model, original, checkpoint_name, combiner_checkpoint, tokenizer) -> str:
    config = model.config
    tower = (
        f"ModifiedResNet layers={config.vision_config.layers} width={config.vision_config.width}"
        if config.vision_tower == "resnet"
        else f"ViT patch={config.vision_config.patch_size} layers={config.vision_config.num_hidden_layers}"
    )
    return f"""---
library_name: transformers
tags: [composed-image-retrieval, spn4cir, clip4cir]
---
# CLIP4CIR converted from `{checkpoint_name}`

Converted with `python -m modeling_spn4cir.convert_original_checkpoint` from the original
`{original.source_format}` format{f" (epoch {original.epoch})" if original.epoch is not None else ""}.

| field | value |
|---|---|
| image tower | {tower}, {config.image_size} px |
| embedding dim | {config.projection_dim} |
| fusion | {config.fusion}{f" (Combiner from `{Path(combiner_checkpoint).name}`)" if combiner_checkpoint else ""} |
| temperature | {config.temperature} |
| tokenizer | {tokenizer or "not included"} |
| preprocessing | TargetPad 1.25, bicubic, CLIP mean/std |

```python
import modeling_spn4cir  # or pass trust_remote_code=True
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("<this repo>")
processor = AutoProcessor.from_pretrained("<this repo>")
```
Text features are pooled at the highest token id of each row (OpenAI CLIP's EOT rule).
"""


def main(argv=None):
    parser = converter_parser(__doc__, "SPN4CIR best.pt, CLIP4Cir stage-1 .pt, or OpenAI CLIP .pt",
                              "tokenizer to save with the model, e.g. openai/clip-vit-base-patch32")
    parser.add_argument("--combiner_checkpoint", help="CLIP4Cir Combiner .pt -> fusion 'combiner'")
    parser.set_defaults(temperature=0.02)
    args = parser.parse_args(argv)
    with allow_nonfinite_weights(args.allow_nonfinite_weights):
        out = convert_original_checkpoint(args.checkpoint, args.output_dir, combiner_checkpoint=args.combiner_checkpoint,
                                          tokenizer=args.tokenizer, image_size=args.image_size,
                                          temperature=args.temperature, push_to_hub=args.push_to_hub,
                                          overwrite_output_dir=args.overwrite_output_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
