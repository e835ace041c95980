"""Convert original SPRC / SPN4CIR-SPRC checkpoints (LAVIS `Blip2QformerCirAlignPrompt`) into an SPRC directory.

Reads, with `torch.load(..., weights_only=True)` only (no arbitrary unpickling):
- SPN4CIR stage 2 (`blip24cir/utils.py:save_model`): `{"epoch", "state_dict": {"blip_model.<key>": tensor}}`, with
  the trained caption-side copy `Qformer_query.*` / `text_proj_q.*` and `temp` = the stage-2 tau;
- SPRC stage 1: `{"epoch", "Blip2QformerCirAlignPrompt": {<key>: tensor}}` (no copy; `temp` = SPRC's learnt one);
- a bare `Blip2QformerCirAlignPrompt` state dict.

Everything the weights determine (widths, depths, vocabulary, positions, cross-attention layout, query tokens, joint
dimension) is inferred from them. Attention heads are not: they follow the released models' rule (16 for EVA
ViT-g's width 1408, else width // 64; Q-Former width // 64) unless given with `--num_heads vision=N` /
`--num_heads qformer=N`. Every key is mapped or an error naming it, except `*.bert.embeddings.position_ids`
(a buffer) and `*.cls.*` (the LM head, unused by retrieval), which are dropped on purpose.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir spn4cir-sprc-cirr \\
        --tokenizer bert-base-uncased
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import run_cli
from ..conversion_utils import (CheckpointMismatchError, check_image_size, check_state_dict, conversion_card,
                                converter_parser, load_checkpoint, run_converter, write_converted)
from ..conversion_utils import parse_num_heads as _parse_num_heads
from ..conversion_utils import timm_vit_backbone
from . import SPEC
from .configuration_sprc import SPRCConfig
from .modeling_sprc import SPRCModel

STAGE1_KEY = "Blip2QformerCirAlignPrompt"
STAGE2_PREFIX = "blip_model."
TOWERS = ("vision", "qformer")
# Dropped on purpose: a buffer transformers recreates, and the Q-Former's LM head (captioning only).
IGNORED_PATTERNS = (r"(Qformer|Qformer_query)\.bert\.embeddings\.position_ids", r"(Qformer|Qformer_query)\.cls\..+")

_VIT_BLOCK = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight", "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_DIRECT = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "query_tokens": "query_tokens",
    "prompt_tokens": "prompt_tokens",
    "temp": "temp",
    "vision_proj.weight": "vision_projection.weight", "vision_proj.bias": "vision_projection.bias",
    "text_proj.weight": "text_projection.weight", "text_proj.bias": "text_projection.bias",
    "itm_head.weight": "itm_head.weight", "itm_head.bias": "itm_head.bias",
    "text_proj_q.weight": "qformer_query.text_projection.weight",
    "text_proj_q.bias": "qformer_query.text_projection.bias",
}
# (embeddings module, Q-Former module) of the shared Q-Former and of the stage-2 copy
_QFORMERS = {"Qformer": ("embeddings", "qformer"), "Qformer_query": ("qformer_query.embeddings", "qformer_query.qformer")}


@dataclass
class OriginalCheckpoint:
    """A `Blip2QformerCirAlignPrompt` state dict pulled out of one of the original on-disk formats."""

    state_dict: dict[str, torch.Tensor]
    source_format: str  # "spn4cir_stage2" | "sprc_stage1" | "bare"
    epoch: int | None = None


def read_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Detect the format of an original SPRC checkpoint and return its `Blip2QformerCirAlignPrompt` state dict."""
    data = load_checkpoint(path)
    epoch = data.get("epoch") if isinstance(data.get("epoch"), int) else None
    if isinstance(data.get("state_dict"), dict):
        state = data["state_dict"]
        foreign = [k for k in state if not k.startswith(STAGE2_PREFIX)]
        if foreign:
            raise CheckpointMismatchError(f"{path}: SPN4CIR state_dict keys outside {STAGE2_PREFIX!r} cannot be mapped "
                                          f"to SPRC: {foreign[:10]} ({len(foreign)} keys).")
        return OriginalCheckpoint({k[len(STAGE2_PREFIX):]: v for k, v in state.items()}, "spn4cir_stage2", epoch)
    if isinstance(data.get(STAGE1_KEY), dict):
        return OriginalCheckpoint(dict(data[STAGE1_KEY]), "sprc_stage1", epoch)
    if "query_tokens" in data and "visual_encoder.cls_token" in data:
        return OriginalCheckpoint(dict(data), "bare", None)
    raise ValueError(f"{path}: unknown checkpoint format (top-level keys {sorted(data)[:10]}); expected 'state_dict' "
                     f"(SPN4CIR stage 2), {STAGE1_KEY!r} (SPRC stage 1) or a bare Blip2QformerCirAlignPrompt state dict.")


def backbone(original: OriginalCheckpoint) -> str:
    """BLIP-2's image tower by its weights (`"ViT-g/14 224px"`, EVA ViT-g): the model zoo's identity of a
    checkpoint, whatever its path."""
    return timm_vit_backbone(original.state_dict)


def parse_num_heads(values) -> dict[str, int]:
    """`--num_heads` values for this family's towers {TOWERS}: see `conversion_utils.parse_num_heads`."""
    return _parse_num_heads(values, TOWERS)


def default_num_heads(tower: str, width: int) -> int:
    """The released models' rule: EVA ViT-g (width 1408) has 16 heads, other ViTs and the Q-Former width // 64."""
    if tower == "vision" and width == 1408:
        return 16
    return max(width // 64, 1)


def _layer_indices(state: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"Missing key {key!r}: this is not a Blip2QformerCirAlignPrompt state dict.")
    return state[key]


def infer_config(state: dict[str, torch.Tensor], num_heads: dict[str, int] | None = None,
                 temperature: float | None = None) -> SPRCConfig:
    """Geometry from a `Blip2QformerCirAlignPrompt` state dict (plus head counts, which weights do not fix)."""
    num_heads = dict(num_heads or {})
    width = _require(state, "visual_encoder.cls_token").shape[-1]
    patch = _require(state, "visual_encoder.patch_embed.proj.weight")
    positions = _require(state, "visual_encoder.pos_embed").shape[1]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointMismatchError(f"visual_encoder.pos_embed has {positions} positions, not 1 + a square grid.")
    blocks = _layer_indices(state, "visual_encoder.blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointMismatchError(f"visual_encoder.blocks are not numbered 0..n-1: {blocks}")
    vision_config = {
        "hidden_size": width,
        "intermediate_size": _require(state, "visual_encoder.blocks.0.mlp.fc1.weight").shape[0],
        "num_hidden_layers": len(blocks),
        "num_attention_heads": num_heads.get("vision", default_num_heads("vision", width)),
        "image_size": grid * patch.shape[-1],
        "patch_size": patch.shape[-1],
        "num_channels": patch.shape[1],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": "visual_encoder.blocks.0.attn.q_bias" in state,
    }
    words = _require(state, "Qformer.bert.embeddings.word_embeddings.weight")
    hidden = words.shape[1]
    layers = _layer_indices(state, "Qformer.bert.encoder.layer.")
    cross = [i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight" in state]
    if not layers or layers != list(range(len(layers))) or not cross or cross[0] != 0:
        raise CheckpointMismatchError(f"Q-Former layers {layers} with cross-attention in {cross}: not a Q-Former.")
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != [i for i in layers if i % frequency == 0]:
        raise CheckpointMismatchError(f"Cross-attention in Q-Former layers {cross} is not every k-th layer.")
    encoder_width = state["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape[1]
    if encoder_width != width:
        raise CheckpointMismatchError(f"Q-Former cross-attention reads width {encoder_width}, the ViT has {width}.")
    qformer_config = {
        "vocab_size": words.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": num_heads.get("qformer", default_num_heads("qformer", hidden)),
        "intermediate_size": _require(state, "Qformer.bert.encoder.layer.0.intermediate.dense.weight").shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": _require(state, "Qformer.bert.embeddings.position_embeddings.weight").shape[0],
        "pad_token_id": 0,
        "cross_attention_frequency": frequency,
        "encoder_hidden_size": width,
        "use_qformer_text_input": True,
    }
    for tower, size, config in (("vision", width, vision_config), ("qformer", hidden, qformer_config)):
        if size % config["num_attention_heads"]:
            raise ValueError(f"{tower} width {size} is not a multiple of {config['num_attention_heads']} heads; pass "
                             f"--num_heads {tower}=N.")
    separate = any(k.startswith("Qformer_query.") for k in state)
    kwargs = {}
    if temperature is not None:
        kwargs["temperature"] = temperature
    elif separate and "temp" in state:
        kwargs["temperature"] = float(state["temp"])  # stage 2 stores its tau as `temp`
    if not separate and "temp" in state:
        kwargs["stage1_temperature"] = float(state["temp"])
    return SPRCConfig(
        vision_config=vision_config,
        qformer_config=qformer_config,
        num_query_tokens=_require(state, "query_tokens").shape[1],
        embed_dim=_require(state, "vision_proj.weight").shape[0],
        tie_query_side=not separate,
        **kwargs,
    )


def _map_qformer_key(rest: str) -> str | None:
    """Key inside a LAVIS `BertLMHeadModel` (after `Qformer.`) -> (part, key) inside our modules; None if unknown."""
    embeddings = {"bert.embeddings.word_embeddings.weight": ("embeddings", "word_embeddings.weight"),
                  "bert.embeddings.position_embeddings.weight": ("embeddings", "position_embeddings.weight"),
                  "bert.embeddings.LayerNorm.weight": ("qformer", "layernorm.weight"),
                  "bert.embeddings.LayerNorm.bias": ("qformer", "layernorm.bias")}
    if rest in embeddings:
        return embeddings[rest]
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", rest)
    if not m:
        return None
    layer, inner = m.groups()
    m = re.fullmatch(r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)", inner)
    if m:
        return "qformer", f"encoder.layer.{layer}.{m.group(1)}.attention.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)", inner)
    if m:
        return "qformer", f"encoder.layer.{layer}.{inner}"
    m = re.fullmatch(r"(intermediate|intermediate_query)\.dense\.(weight|bias)", inner)
    if m:
        return "qformer", f"encoder.layer.{layer}.{inner}"
    m = re.fullmatch(r"(output|output_query)\.(dense|LayerNorm)\.(weight|bias)", inner)
    if m:
        return "qformer", f"encoder.layer.{layer}.{inner}"
    return None


def map_key(key: str) -> str | None:
    """Original key -> SPRCModel key (None when unknown). The ViT's q/v biases are handled by the caller."""
    if key in _DIRECT:
        return _DIRECT[key]
    m = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _VIT_BLOCK:
        return f"vision_model.encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}"
    m = re.fullmatch(r"(Qformer|Qformer_query)\.(.+)", key)
    if m:
        mapped = _map_qformer_key(m.group(2))
        if mapped is not None:
            part, inner = mapped
            embeddings, qformer = _QFORMERS[m.group(1)]
            return f"{embeddings if part == 'embeddings' else qformer}.{inner}"
    return None


def ignored_keys(state: dict) -> list[str]:
    """The keys dropped on purpose (named in the model card and the log)."""
    return [k for k in state if any(re.fullmatch(p, k) for p in IGNORED_PATTERNS)]


def convert_state_dict(state: dict[str, torch.Tensor], model: SPRCModel) -> dict[str, torch.Tensor]:
    """Map a `Blip2QformerCirAlignPrompt` state dict onto `model`'s keys; every key must be accounted for."""
    converted, unmapped = {}, []
    ignored = set(ignored_keys(state))
    for key, value in state.items():
        if key in ignored:
            continue
        m = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias", key)
        if m:
            if m.group(2) == "q":
                v_key = f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"
                if v_key not in state:
                    raise CheckpointMismatchError(f"{key} without {v_key}.")
                # transformers fuses the biases into qkv.bias with a zero key part (LAVIS has no key bias).
                converted[f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat(
                    [value, torch.zeros_like(value), state[v_key]])
            continue
        target = map_key(key)
        if target is None:
            unmapped.append(key)
            continue
        converted[target] = value
    if "temp" in converted and not model.config.tie_query_side:
        # Stage 2 overwrote SPRC's learnt temperature with its tau (config.temperature); the stage-1 one is lost.
        converted["temp"] = torch.tensor(model.config.stage1_temperature)
    if unmapped:
        raise CheckpointMismatchError(f"Unmapped checkpoint keys ({len(unmapped)}): {unmapped}")
    return check_state_dict(converted, model, "SPRC")


def load_original_model(checkpoint: str | os.PathLike, num_heads: dict[str, int] | list[str] | None = None,
                        temperature: float | None = None) -> tuple[SPRCModel, OriginalCheckpoint]:
    """Build an [`SPRCModel`] (eval mode) with the weights of an original checkpoint."""
    if not isinstance(num_heads, dict):
        num_heads = parse_num_heads(num_heads)
    original = read_original_checkpoint(checkpoint)
    config = infer_config(original.state_dict, num_heads, temperature)
    model = SPRCModel(config)
    model.load_state_dict(convert_state_dict(original.state_dict, model), strict=True)
    return model.eval(), original


def convert_original_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                                tokenizer: str | None = None, push_to_hub: str | None = None,
                                num_heads: dict[str, int] | list[str] | None = None, temperature: float | None = None,
                                image_size: int | None = None, overwrite_output_dir: bool = False) -> Path:
    """Convert and write `output_dir` (model.safetensors, config, code, processor or image processor, model card);
    the directory appears complete or not at all. Returns its path."""
    model, original = load_original_model(checkpoint, num_heads, temperature)
    check_image_size(model, image_size)
    tok = SPEC.load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and len(tok) != model.config.qformer_config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {len(tok)} tokens, the Q-Former's word embeddings "
                         f"{model.config.qformer_config.vocab_size}.")
    card = _model_card(model, original, checkpoint, tokenizer, ignored_keys(original.state_dict))
    return write_converted(model, SPEC.build_processor(model.config, tok), card, output_dir, push_to_hub,
                           overwrite=overwrite_output_dir, protect=[checkpoint])


def _model_card(model, original, checkpoint, tokenizer, ignored) -> str:
    config = model.config
    vision, qformer = config.vision_config, config.qformer_config
    dropped = sorted({re.sub(r"\.\d+\.", ".N.", k) for k in ignored})
    rows = [("ViT", f"width {vision.hidden_size}, {vision.num_hidden_layers} layers, {vision.num_attention_heads} "
                    f"heads, {config.image_size} px"),
            ("Q-Former", f"width {qformer.hidden_size}, {qformer.num_hidden_layers} layers, {qformer.num_attention_heads} "
                         f"heads, cross-attention every {qformer.cross_attention_frequency}"),
            ("query tokens / embedding dim", f"{config.num_query_tokens} / {config.embed_dim}"),
            ("stage-2 query-side copy", "no (stage-1 model)" if config.tie_query_side else "yes (qformer_query)"),
            ("temperature (stage-2 tau)", config.temperature), ("tokenizer", tokenizer or "not included"),
            ("preprocessing", "TargetPad 1.25, bicubic, CLIP mean/std; captions: LAVIS pre_caption, 32 tokens"),
            ("dropped keys", ", ".join(dropped) or "none")]
    note = ("Scores are `max_q query . target[q]` over the 32 target tokens (`model.similarity`). "
            "`AutoModel.from_pretrained(..., dtype=torch.bfloat16)` runs the ViT in bf16, the rest in fp32.")
    return conversion_card(SPEC.title, [SPEC.name, "blip-2"], checkpoint, original, rows, note=note)


def main(argv=None):
    parser = converter_parser(__doc__, "SPN4CIR stage-2 best.pt, or SPRC stage-1 .pt",
                              "bert-base-uncased (Hub id or directory) or a vocab.txt; [DEC] is added", TOWERS,
                              "stage-2 tau; default: the stage-2 checkpoint's temp, or 0.05")
    run_converter(parser, convert_original_checkpoint, argv)


if __name__ == "__main__":
    run_cli(main)
