"""OpenAI CLIP state dicts (`clip.model.build_model`'s names) -> transformers' CLIP names and tower configs: what the
CLIP4CIR and TG-CIR converters share (both families' original checkpoints hold an OpenAI CLIP, the second under
`backbone.clip.`). Converters are not shipped with checkpoints, so they may import this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .conversion_utils import count_blocks, vit_backbone

# (blocks per stage, stem width) of OpenAI's ModifiedResNets
OPENAI_RESNETS = {((3, 4, 6, 3), 64): "RN50", ((3, 4, 23, 3), 64): "RN101", ((4, 6, 10, 6), 80): "RN50x4",
                  ((6, 8, 18, 8), 96): "RN50x16", ((3, 15, 36, 10), 128): "RN50x64"}

# Keys of OpenAI checkpoints with no counterpart on purpose: `logit_scale` is CLIP's pre-training temperature (CIR
# uses `config.temperature`); the other three are metadata that `build_model` deletes.
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
TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_IN_PROJ = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def _map_key(key: str, vision_tower: str) -> str | None:
    """OpenAI key -> transformers CLIP key (for non-attention-in-proj keys); None when unknown."""
    # The ModifiedResNet keeps OpenAI's names (its stem also has a `visual.conv1`).
    if vision_tower == "resnet" and re.match(r"visual\.(conv[123]|bn[123]|layer\d+|attnpool)\.", key):
        return "vision_model." + key[len("visual."):]
    if key in _DIRECT:
        return _DIRECT[key]
    if key in TRANSPOSED:
        return TRANSPOSED[key]
    for src_prefix, dst_prefix in (
        ("transformer.resblocks.", "text_model.encoder.layers."),
        ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ):
        m = re.fullmatch(re.escape(src_prefix) + r"(\d+)\.(.+)", key)
        if m and m.group(2) in _TRANSFORMER_BLOCK:
            return f"{dst_prefix}{m.group(1)}.{_TRANSFORMER_BLOCK[m.group(2)]}"
    return None


def convert_openai_clip_entry(key: str, value: torch.Tensor, vision_tower: str = "vit") -> dict | None:
    """One OpenAI CLIP entry -> the transformers CLIP entries it becomes (`{}` for the ignored keys), None when the
    key is unknown. `vision_tower`: `"vit"` or `"resnet"` (the ModifiedResNet keeps OpenAI's names)."""
    if key in IGNORED_KEYS:
        return {}
    m = _IN_PROJ.fullmatch(key)
    if m:
        tower = "vision_model" if m.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{m.group(2)}.self_attn"
        # nn.MultiheadAttention packs q, k, v along the output dimension.
        return {f"{prefix}.{name}.{m.group(3)}": chunk.clone()
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0))}
    target = _map_key(key, vision_tower)
    if target is None:
        return None
    return {target: value.t().contiguous() if key in TRANSPOSED else value}


def openai_clip_text_config(state: Mapping[str, torch.Tensor], prefix: str = "",
                            num_attention_heads: int | None = None) -> dict:
    """The `CLIPTextConfig` of the OpenAI CLIP under `prefix` in `state` (heads: OpenAI's `width // 64` unless
    given), projecting to its joint dimension."""
    width = state[f"{prefix}ln_final.weight"].shape[0]
    vocab_size = state[f"{prefix}token_embedding.weight"].shape[0]
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": count_blocks(state, f"{prefix}transformer.resblocks."),
        "num_attention_heads": num_attention_heads or width // 64,
        "max_position_embeddings": state[f"{prefix}positional_embedding"].shape[0],
        "projection_dim": state[f"{prefix}text_projection"].shape[1],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "pad_token_id": 0,  # OpenAI's tokenizer pads with 0
        "bos_token_id": vocab_size - 2,
        # eos_token_id == 2 makes transformers pool at argmax(input_ids): OpenAI CLIP's rule (EOT is the highest id
        # of every row), which the original checkpoints were trained with.
        "eos_token_id": 2,
    }


def openai_clip_vit_config(state: Mapping[str, torch.Tensor], prefix: str = "",
                           num_attention_heads: int | None = None) -> dict:
    """The `CLIPVisionConfig` of the OpenAI CLIP ViT under `prefix` in `state` (heads as the text tower's)."""
    width = state[f"{prefix}visual.conv1.weight"].shape[0]
    patch_size = state[f"{prefix}visual.conv1.weight"].shape[-1]
    grid = round((state[f"{prefix}visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": state[f"{prefix}visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": count_blocks(state, f"{prefix}visual.transformer.resblocks."),
        "num_attention_heads": num_attention_heads or width // 64,
        "image_size": patch_size * grid,
        "patch_size": patch_size,
        "projection_dim": state[f"{prefix}text_projection"].shape[1],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def openai_clip_backbone(state: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """`"RN50x4 288px"`, `"ViT-B/16 224px"`: the image tower of the OpenAI CLIP state dict under `prefix`, by its
    geometry (an unnamed ResNet as `"ModifiedResNet-1-2-1-1-w8 64px"`)."""
    if f"{prefix}visual.proj" in state:
        config = openai_clip_vit_config(state, prefix)
        return vit_backbone(config["hidden_size"], config["num_hidden_layers"], config["patch_size"],
                            config["image_size"])
    layers = tuple(count_blocks(state, f"{prefix}visual.layer{b}.") for b in (1, 2, 3, 4))
    width = state[f"{prefix}visual.layer1.0.conv1.weight"].shape[0]
    grid = round((state[f"{prefix}visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    name = OPENAI_RESNETS.get((layers, width), f"ModifiedResNet-{'-'.join(map(str, layers))}-w{width}")
    return f"{name} {grid * 32}px"


__all__ = ["IGNORED_KEYS", "OPENAI_RESNETS", "TRANSPOSED", "convert_openai_clip_entry", "openai_clip_backbone",
           "openai_clip_text_config",
           "openai_clip_vit_config"]
