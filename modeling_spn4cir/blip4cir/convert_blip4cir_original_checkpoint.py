"""Convert original SPN4CIR BLIP4CIR checkpoints into a BLIP4CIR directory.

Reads, with `torch.load(..., weights_only=True)` only (no arbitrary unpickling):
- SPN4CIR stage 2 (`best.pt`, `utils.save_model`): `{"epoch", "state_dict": {"tau", "blip.<key>": tensor}}`;
- stage 1 (what SPN's `train.py --model_path` reads): `{"epoch", "BLIP_Retrieval": {<key>: tensor}}`;
- a bare `BLIP_Retrieval.state_dict()`.

Keys are mapped onto transformers' `BlipVisionModel` / `BlipTextModel` names; `temp` (BLIP's retrieval
temperature, unused by SPN) and the `text_encoder.embeddings.position_ids` buffer are dropped on purpose, every
other key is mapped or an error that names it. The geometry is inferred from the weights; attention heads,
which the weights do not determine, default to width // 64 (BLIP's ViT-B/L and BERT) and are set with
`--num_heads text=N --num_heads vision=N`.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir spn4cir-blip4cir-fiq \\
        --tokenizer bert-base-uncased
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import run_cli
from ..conversion_utils import (CheckpointMismatchError, check_image_size, check_state_dict, conversion_card,
                                converter_parser, count_blocks, load_checkpoint, run_converter, write_converted)
from ..conversion_utils import parse_num_heads as _parse_num_heads
from ..conversion_utils import timm_vit_backbone
from . import SPEC
from .configuration_blip4cir import BLIP_VIT_LAYER_NORM_EPS, BLIP4CIRConfig
from .modeling_blip4cir import BLIP4CIRModel

# Dropped on purpose: BLIP's ITC temperature (SPN trains its own `tau`), and a buffer (arange) that
# transformers keeps non-persistent.
IGNORED_KEYS = ("temp", "text_encoder.embeddings.position_ids")
TOWERS = ("text", "vision")

_VIT_DIRECT = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual_encoder.norm.weight": "vision_model.post_layernorm.weight",
    "visual_encoder.norm.bias": "vision_model.post_layernorm.bias",
}
_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TEXT_LAYER_PARTS = (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "attention.output.LayerNorm",
    "crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
    "crossattention.output.dense", "crossattention.output.LayerNorm",
    "intermediate.dense", "output.dense", "output.LayerNorm",
)
_TEXT_DIRECT = (
    "text_encoder.embeddings.word_embeddings.weight",
    "text_encoder.embeddings.position_embeddings.weight",
    "text_encoder.embeddings.LayerNorm.weight",
    "text_encoder.embeddings.LayerNorm.bias",
    "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
)


@dataclass
class OriginalCheckpoint:
    """A `BLIP_Retrieval` state dict pulled out of one of the original on-disk formats."""

    blip_state_dict: dict[str, torch.Tensor]
    source_format: str  # "spn4cir_stage2" | "blip4cir_stage1" | "blip_retrieval"
    epoch: int | None = None
    tau: torch.Tensor | None = None


def read_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Detect the format of an original BLIP4CIR checkpoint and return its `BLIP_Retrieval` state dict."""
    data = load_checkpoint(path)
    epoch = data.get("epoch") if isinstance(data.get("epoch"), int) else None
    if isinstance(data.get("state_dict"), dict):
        state = dict(data["state_dict"])
        tau = state.pop("tau", None)
        foreign = [k for k in state if not k.startswith("blip.")]
        if foreign:
            raise CheckpointMismatchError(
                f"{path}: SPN4CIR state_dict keys outside 'blip.' and 'tau' cannot be mapped to BLIP4CIR: "
                f"{foreign[:10]}{' ...' if len(foreign) > 10 else ''} ({len(foreign)} keys)."
            )
        return OriginalCheckpoint({k[len("blip."):]: v for k, v in state.items()}, "spn4cir_stage2", epoch, tau)
    if isinstance(data.get("BLIP_Retrieval"), dict):
        return OriginalCheckpoint(dict(data["BLIP_Retrieval"]), "blip4cir_stage1", epoch)
    if "visual_encoder.cls_token" in data:
        return OriginalCheckpoint(dict(data), "blip_retrieval", None)
    raise ValueError(
        f"{path}: unknown checkpoint format (top-level keys {sorted(data)[:10]}); expected 'state_dict' (SPN4CIR "
        "stage 2), 'BLIP_Retrieval' (stage 1) or a bare BLIP_Retrieval state dict."
    )


def backbone(original: OriginalCheckpoint) -> str:
    """BLIP's ViT by its weights (`"ViT-B/16 384px"` for BLIP base): the model zoo's identity of a checkpoint,
    whatever its path."""
    return timm_vit_backbone(original.blip_state_dict)


def parse_num_heads(values) -> dict[str, int]:
    """`--num_heads` values for this family's towers {TOWERS}: see `conversion_utils.parse_num_heads`."""
    return _parse_num_heads(values, TOWERS)


def infer_config(
    state: dict[str, torch.Tensor], num_heads=None, temperature: float = 0.03, enc_token_id: int | None = None
) -> BLIP4CIRConfig:
    """Geometry from a `BLIP_Retrieval` state dict (everything the weights determine)."""
    required = ("visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
                "text_encoder.embeddings.word_embeddings.weight", "text_encoder.embeddings.position_embeddings.weight",
                "vision_proj.weight", "text_proj.weight")
    for key in required:
        if key not in state:
            raise CheckpointMismatchError(f"Missing key {key!r}: this is not a BLIP_Retrieval state dict.")
    heads = parse_num_heads(num_heads)
    vision_width = state["visual_encoder.cls_token"].shape[-1]
    patch_size = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    num_positions = state["visual_encoder.pos_embed"].shape[1]
    grid = round((num_positions - 1) ** 0.5)
    if grid * grid + 1 != num_positions:
        raise CheckpointMismatchError(f"visual_encoder.pos_embed has {num_positions} positions, not 1 + a square.")
    vision_layers = count_blocks(state, "visual_encoder.blocks.")
    text_layers = count_blocks(state, "text_encoder.encoder.layer.")
    if vision_layers == 0 or text_layers == 0:
        raise CheckpointMismatchError(f"Found {vision_layers} ViT blocks and {text_layers} text layers.")
    if "text_encoder.encoder.layer.0.crossattention.self.key.weight" not in state:
        raise CheckpointMismatchError(
            "Missing key 'text_encoder.encoder.layer.0.crossattention.self.key.weight': BLIP4CIR's text encoder "
            "cross-attends to the reference image."
        )
    word_embeddings = state["text_encoder.embeddings.word_embeddings.weight"]
    vocab_size, text_width = word_embeddings.shape
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": vision_layers,
        "num_attention_heads": heads.get("vision", vision_width // 64),
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "hidden_act": "gelu",
        "layer_norm_eps": BLIP_VIT_LAYER_NORM_EPS,
        "projection_dim": state["vision_proj.weight"].shape[0],
    }
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "encoder_hidden_size": state["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1],
        "intermediate_size": state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads.get("text", text_width // 64),
        "max_position_embeddings": state["text_encoder.embeddings.position_embeddings.weight"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        # med_config.json's dropout (BLIP pre-training / stage 1); SPN's stage 2 trains in eval mode.
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "projection_dim": state["text_proj.weight"].shape[0],
        "pad_token_id": 0,
        "sep_token_id": 102,
        "bos_token_id": vocab_size - 2,  # [DEC]
    }
    for tower, config in (("vision", vision_config), ("text", text_config)):
        width, number = config["hidden_size"], config["num_attention_heads"]
        if number < 1 or width % number:
            raise ValueError(f"{tower} width {width} is not divisible by {number} attention heads; pass "
                             f"--num_heads {tower}=N.")
    return BLIP4CIRConfig(
        text_config=text_config,
        vision_config=vision_config,
        embed_dim=state["text_proj.weight"].shape[0],
        temperature=float(temperature),
        enc_token_id=enc_token_id,
    )


def _map_key(key: str) -> str | None:
    """`BLIP_Retrieval` key -> BLIP4CIR key; None when unknown."""
    if key in _VIT_DIRECT:
        return _VIT_DIRECT[key]
    m = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\."
                     r"(weight|bias)", key)
    if m:
        return f"vision_model.encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"
    if key in _TEXT_DIRECT:
        return key
    m = re.fullmatch(r"text_encoder\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m.group(2) in _TEXT_LAYER_PARTS:
        return key
    return None


def convert_state_dict(state: dict[str, torch.Tensor], model: BLIP4CIRModel,
                       tau: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Map a `BLIP_Retrieval` state dict (+ SPN's `tau`) onto `model`'s keys; every key must be accounted for."""
    converted, unmapped = {}, []
    for key, value in state.items():
        if key in IGNORED_KEYS:
            continue
        target = _map_key(key)
        if target is None:
            unmapped.append(key)
            continue
        converted[target] = value
    if unmapped:
        raise CheckpointMismatchError(f"Unmapped checkpoint keys ({len(unmapped)}): {unmapped}")
    converted["tau"] = (tau if tau is not None else torch.tensor(float(model.config.temperature))).reshape(())
    if model.reversal_token is not None:  # not in SPN checkpoints: keep the model's initialization
        converted["reversal_token"] = model.reversal_token.detach().clone()
    return check_state_dict(converted, model, "BLIP4CIR")


def load_original_model(
    path: str | os.PathLike,
    num_heads=None,
    temperature: float | None = None,
    enc_token_id: int | None = None,
) -> tuple[BLIP4CIRModel, OriginalCheckpoint]:
    """Build a [`BLIP4CIRModel`] (eval mode, fp32) with the weights of an original checkpoint. `temperature`
    defaults to the checkpoint's `tau` (stage 2), else 0.03 (SPN's `--tau` default, FashionIQ)."""
    original = read_original_checkpoint(path)
    if temperature is None:
        # 7 significant digits name the same float32 value without its binary noise (0.03, not 0.0299999993)
        temperature = float(f"{float(original.tau):.7g}") if original.tau is not None else 0.03
        tau = original.tau
    else:
        tau = torch.tensor(float(temperature))
    config = infer_config(original.blip_state_dict, num_heads, temperature, enc_token_id)
    model = BLIP4CIRModel(config)
    state = convert_state_dict(original.blip_state_dict, model, tau)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.float().eval(), original


def convert_original_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, tokenizer=None,
                                push_to_hub: str | None = None, num_heads=None, temperature: float | None = None,
                                image_size: int | None = None, overwrite_output_dir: bool = False) -> Path:
    """Convert and write `output_dir` (model.safetensors, config, code, processor or image processor, model
    card); the directory appears complete or not at all. `tokenizer`: a BERT tokenizer (Hub id, directory,
    `vocab.txt`, or a tokenizer object) to which BLIP's `[DEC]`/`[ENC]` are added. Returns the path."""
    model, original = load_original_model(checkpoint, num_heads, temperature)
    check_image_size(model, image_size)
    tokenizer_name = None if tokenizer is None else type(tokenizer).__name__
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer_name, tokenizer = tokenizer, SPEC.load_tokenizer(tokenizer)
    processor = SPEC.build_processor(model.config, tokenizer)
    if tokenizer is not None:
        vocab_size, enc = model.config.text_config.vocab_size, tokenizer.convert_tokens_to_ids("[ENC]")
        if len(tokenizer) != vocab_size or enc != model.config.enc_token_id:
            raise ValueError(
                f"Tokenizer has {len(tokenizer)} tokens and [ENC]={enc}; the checkpoint has a vocabulary of "
                f"{vocab_size} and [ENC]={model.config.enc_token_id}: it was trained with another tokenizer."
            )
    return write_converted(model, processor, _model_card(model, original, checkpoint, tokenizer_name), output_dir,
                           push_to_hub, overwrite=overwrite_output_dir, protect=[checkpoint])


def _model_card(model, original, checkpoint, tokenizer_name) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    rows = [("image tower", f"BLIP ViT patch={vision.patch_size} width={vision.hidden_size} layers="
                            f"{vision.num_hidden_layers} heads={vision.num_attention_heads}, {config.image_size} px"),
            ("text encoder", f"BERT width={text.hidden_size} layers={text.num_hidden_layers} heads="
                             f"{text.num_attention_heads}, cross-attention to {config.num_image_tokens} ViT tokens"),
            ("embedding dim", config.embed_dim), ("temperature (learnable tau)", f"{model.tau.item():.6g}"),
            ("tokenizer", f"{tokenizer_name or 'not included'} (+ [DEC], [ENC]; [ENC] replaces [CLS])"),
            ("preprocessing", f"TargetPad 1.25, bicubic, {config.image_size} px, CLIP mean/std")]
    note = ("Reference features (what stage 2 banks) are the reference image's ViT tokens "
            f"`[N, {config.num_image_tokens}, {vision.hidden_size}]`.")
    return conversion_card(SPEC.title, [SPEC.name], checkpoint, original, rows, note=note)


def main(argv=None):
    parser = converter_parser(__doc__, "SPN4CIR best.pt (stage 2) or BLIP4CIR stage-1 .pt",
                              "BERT tokenizer (Hub id, directory or vocab.txt), e.g. bert-base-uncased", TOWERS,
                              "tau; default: the checkpoint's tau (stage 2), else 0.03")
    run_converter(parser, convert_original_checkpoint, argv)


if __name__ == "__main__":
    run_cli(main)
