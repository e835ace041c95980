"""Convert original SPN4CIR / CLIP4Cir checkpoints (OpenAI `clip` state dicts) into a CLIP4CIR directory.

Reads, with `torch.load(..., weights_only=True)` only (no arbitrary unpickling):
- SPN4CIR stage 2 (`best.pt`): `{"epoch", "state_dict": {"clip.<openai key>": tensor}}`;
- CLIP4Cir stage 1: `{"epoch", "CLIP": {<openai key>: tensor}}`;
- a bare OpenAI CLIP state dict;
- optionally CLIP4Cir's Combiner `{"epoch", "Combiner": state_dict}` -> `fusion="combiner"`.

The geometry is inferred from the state dict the way OpenAI's `clip.model.build_model` does, every key is
mapped explicitly, and any unmapped, missing or mis-shaped key is an error that names it.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir spn4cir-clip4cir-fiq \\
        --tokenizer openai/clip-vit-base-patch32
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import run_cli
from ..conversion_utils import (CheckpointMismatchError, check_image_size, check_state_dict, conversion_card,
                                converter_parser, count_blocks, load_checkpoint, run_converter, write_converted)
from ..openai_clip_conversion import (convert_openai_clip_entry, openai_clip_backbone, openai_clip_text_config,
                                      openai_clip_vit_config)
from . import SPEC
from .configuration_clip4cir import CLIP4CIRConfig
from .modeling_clip4cir import CLIP4CIRModel


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


def backbone(original: OriginalCheckpoint) -> str:
    """The image tower of the checkpoint by its weights (`"RN50x4 288px"`, `"ViT-B/32 224px"`): the model zoo's
    identity of a checkpoint, whatever its path."""
    return openai_clip_backbone(original.clip_state_dict)


def read_combiner_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    data = load_checkpoint(path)
    if "Combiner" not in data:
        raise ValueError(f"{path}: expected CLIP4Cir's {{'epoch', 'Combiner': state_dict}} format.")
    return dict(data["Combiner"])


def infer_config(
    state: dict[str, torch.Tensor], combiner_state: dict[str, torch.Tensor] | None = None, temperature: float = 0.02
) -> CLIP4CIRConfig:
    """Geometry from an OpenAI CLIP state dict, following `clip.model.build_model`."""
    for key in ("text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight"):
        if key not in state:
            raise CheckpointMismatchError(f"Missing key {key!r}: this is not an OpenAI CLIP state dict.")
    embed_dim = state["text_projection"].shape[1]
    text_config = openai_clip_text_config(state)
    if "visual.proj" in state:
        vision_config = openai_clip_vit_config(state)
    elif "visual.attnpool.positional_embedding" in state:
        vision_width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_config = {
            "model_type": "clip4cir_resnet",
            "layers": [count_blocks(state, f"visual.layer{b}.") for b in (1, 2, 3, 4)],
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


def convert_state_dict(
    state: dict[str, torch.Tensor],
    model: CLIP4CIRModel,
    combiner_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Map an OpenAI CLIP (+ Combiner) state dict onto `model`'s keys; every key must be accounted for."""
    converted, unmapped = {}, []
    for key, value in state.items():
        mapped = convert_openai_clip_entry(key, value, model.config.vision_tower)
        if mapped is None:
            unmapped.append(key)
        else:
            converted.update(mapped)
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


def convert_original_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                                combiner_checkpoint: str | os.PathLike | None = None, tokenizer: str | None = None,
                                image_size: int | None = None, temperature: float = 0.02,
                                push_to_hub: str | None = None, overwrite_output_dir: bool = False) -> Path:
    """Convert and write `output_dir` (model.safetensors, config, code, image processor, tokenizer if given,
    model card); the directory appears complete or not at all. Returns its path."""
    model, original = load_original_model(checkpoint, combiner_checkpoint, temperature)
    check_image_size(model, image_size)
    processor = SPEC.build_processor(model.config, SPEC.load_tokenizer(tokenizer) if tokenizer else None)
    card = _model_card(model, original, checkpoint, combiner_checkpoint, tokenizer)
    return write_converted(model, processor, card, output_dir, push_to_hub,
                           overwrite=overwrite_output_dir, protect=[checkpoint, combiner_checkpoint])


def _model_card(model, original, checkpoint, combiner_checkpoint, tokenizer) -> str:
    config = model.config
    tower = (
        f"ModifiedResNet layers={config.vision_config.layers} width={config.vision_config.width}"
        if config.vision_tower == "resnet"
        else f"ViT patch={config.vision_config.patch_size} layers={config.vision_config.num_hidden_layers}"
    )
    combiner = f" (Combiner from `{Path(combiner_checkpoint).name}`)" if combiner_checkpoint else ""
    rows = [("image tower", f"{tower}, {config.image_size} px"), ("embedding dim", config.projection_dim),
            ("fusion", f"{config.fusion}{combiner}"), ("temperature", config.temperature),
            ("tokenizer", tokenizer or "not included"), ("preprocessing", "TargetPad 1.25, bicubic, CLIP mean/std")]
    return conversion_card(SPEC.title, [SPEC.name], checkpoint, original, rows,
                           note="Text features are pooled at the highest token id of each row (OpenAI CLIP's EOT "
                                "rule).")


def main(argv=None):
    parser = converter_parser(__doc__, "SPN4CIR best.pt, CLIP4Cir stage-1 .pt, or OpenAI CLIP .pt",
                              "tokenizer to save with the model, e.g. openai/clip-vit-base-patch32")
    parser.add_argument("--combiner_checkpoint", help="CLIP4Cir Combiner .pt -> fusion 'combiner'")
    parser.set_defaults(temperature=0.02)
    run_converter(parser, convert_original_checkpoint, argv)


if __name__ == "__main__":
    run_cli(main)
