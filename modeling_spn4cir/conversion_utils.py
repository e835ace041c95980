"""What every family's converter of original checkpoints shares: safe reading, strict key accounting, and
writing the converted directory atomically (and to the Hub).

Converters are not shipped with `trust_remote_code` checkpoints, so they may import this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .cli import add_debug_flag
from .model_cards import cir_card_data, render_card, table, usage, with_model_id
from .storage import apply_umask, atomic_directory

logger = logging.getLogger(__name__)
_ALLOW_NONFINITE = contextvars.ContextVar("allow_nonfinite_weights", default=False)


class CheckpointMismatchError(ValueError):
    """A checkpoint key has no place in the model, a model weight has no key, or shapes differ."""


class NonFiniteWeightsError(ValueError):
    """A checkpoint weight contains NaN or inf (a diverged training run or a corrupt file)."""


@contextlib.contextmanager
def allow_nonfinite_weights(allow: bool = True):
    """Within this block, converting a checkpoint with NaN/inf weights only warns (naming the keys) instead of
    raising `NonFiniteWeightsError`; the CLI's `--allow_nonfinite_weights`."""
    token = _ALLOW_NONFINITE.set(allow)
    try:
        yield
    finally:
        _ALLOW_NONFINITE.reset(token)


def check_finite(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse floating-point tensors with NaN/inf, naming the keys (a warning under `allow_nonfinite_weights()`)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        return
    message = (f"{source}: {len(bad)} weights contain NaN or inf (first: {bad[:5]}); the original training "
               "diverged or the file is corrupt")
    if _ALLOW_NONFINITE.get():
        logger.warning("%s; converting anyway (allow_nonfinite_weights).", message)
        return
    raise NonFiniteWeightsError(
        f"{message}. Convert another checkpoint (e.g. an earlier epoch), or pass --allow_nonfinite_weights "
        "(python -m modeling_spn4cir.convert_original_checkpoint) to convert it anyway."
    )


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


def count_blocks(state: Mapping, prefix: str) -> int:
    """How many numbered blocks `prefix<i>.` the state dict holds (`transformer.resblocks.` -> the layer count)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


# (width, layers) of the standard ViT sizes (EVA ViT-g: 39 blocks in BLIP-2, 40 in EVA-CLIP)
VIT_SIZES = {(768, 12): "B", (1024, 24): "L", (1280, 32): "H", (1408, 39): "g", (1408, 40): "g"}


def vit_backbone(width: int, layers: int, patch: int, image_size: int) -> str:
    """`"ViT-B/16 384px"`: a ViT by its geometry (a non-standard one by width and depth, `"ViT-w32-l2/8 32px"`); how
    the model zoo tells checkpoints apart by their weights, not their path."""
    return f"ViT-{VIT_SIZES.get((width, layers), f'w{width}-l{layers}')}/{patch} {image_size}px"


def timm_vit_backbone(state: Mapping, prefix: str = "visual_encoder.") -> str:
    """The backbone of a timm-style ViT (BLIP's, EVA's: `cls_token`, `pos_embed`, `patch_embed`, `blocks.<i>`)."""
    patch = state[f"{prefix}patch_embed.proj.weight"].shape[-1]
    grid = round((state[f"{prefix}pos_embed"].shape[1] - 1) ** 0.5)
    return vit_backbone(state[f"{prefix}cls_token"].shape[-1], count_blocks(state, f"{prefix}blocks."), patch,
                        grid * patch)


def check_image_size(model, image_size: int | None) -> int:
    """The checkpoint's input resolution (`model.config.image_size`); `--image_size`, when given, must equal it."""
    resolution = model.config.image_size
    if image_size is not None and image_size != resolution:
        raise ValueError(
            f"--image_size {image_size} differs from the checkpoint's resolution {resolution} (fixed by its "
            "position embeddings); drop --image_size or pass the matching value."
        )
    return resolution


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
    check_finite(converted, f"{what} checkpoint")
    return {k: converted[k].to(expected[k].dtype) for k in expected}


CONVERTER_TOOL = "modeling_spn4cir.convert_original_checkpoint"


def conversion_card(title: str, tags: Iterable[str], checkpoint: str | os.PathLike, original,
                    rows: Iterable[tuple[str, object]], details: str = "", note: str = "") -> str:
    """The card of a converted checkpoint: what was converted from which original format (`original.source_format`,
    `original.epoch`), a table of `rows`, how to use it (its id filled in by `write_converted`), and `note`."""
    epoch = f" (epoch {original.epoch})" if original.epoch is not None else ""
    provenance = (f"Converted with `python -m {CONVERTER_TOOL}` from the original `{original.source_format}` "
                  f"format{epoch}{'; ' + details if details else ''}.")
    return render_card(cir_card_data(tags=tags), f"{title} converted from `{Path(checkpoint).name}`", provenance,
                       table(rows), usage(), note)


def write_converted(model, processor, model_card: str, output_dir: str | os.PathLike,
                    push_to_hub: str | None = None, overwrite: bool = False, protect=()) -> Path:
    """Write `model` (safetensors + config + code), its processor (or image processor) and the model card into
    `output_dir`, which appears complete or not at all; optionally push all three to the Hub repo `push_to_hub`.

    `output_dir` must be new, empty, or (with `overwrite`, `--overwrite_output_dir`) a previous converter output,
    and must not be or contain any of `protect` (the checkpoint files); see `storage.atomic_directory`."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, tool=CONVERTER_TOOL, overwrite=overwrite, protect=protect) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        apply_umask(staging)
        # the usage snippet loads this directory, or the Hub repo it is pushed to
        (staging / "README.md").write_text(with_model_id(model_card, push_to_hub or output_dir.name))
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
        from huggingface_hub import upload_file

        upload_file(path_or_fileobj=str(output_dir / "README.md"), path_in_repo="README.md", repo_id=push_to_hub)
    return output_dir


def parse_num_heads(values, towers: tuple[str, ...]) -> dict[str, int]:
    """`["text=8", "vision=12"]` (`--num_heads`, repeatable) or `{"text": 8}` -> `{"text": 8, "vision": 12}`.

    Attention heads are the one geometry the weights do not determine; errors name the bad entry."""
    if values is None:
        return {}
    if isinstance(values, Mapping):
        items = [(str(k), str(v)) for k, v in values.items()]
    else:
        items = []
        for value in values:
            tower, sep, number = str(value).partition("=")
            if not sep:
                raise ValueError(f"--num_heads {value!r}: expected TOWER=N with TOWER in {towers}.")
            items.append((tower.strip(), number.strip()))
    heads = {}
    for tower, number in items:
        if tower not in towers:
            raise ValueError(f"--num_heads {tower}={number}: unknown tower {tower!r}, expected one of {towers} "
                             "(TOWER=N).")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"--num_heads {tower}={number}: expected TOWER=N with N a positive integer.")
        heads[tower] = int(number)
    return heads


def run_converter(parser, convert, argv=None) -> Path:
    """A converter's CLI: parse `argv` with `parser` (`converter_parser` + the family's options) and call
    `convert(checkpoint, output_dir, **every other option)` (NaN/inf weights allowed with
    `--allow_nonfinite_weights`); prints and returns the output directory."""
    options = vars(parser.parse_args(argv))
    with allow_nonfinite_weights(options.pop("allow_nonfinite_weights")):
        out = convert(options.pop("checkpoint"), options.pop("output_dir"), **options)
    print(f"wrote {out}")
    return out


def converter_parser(description: str, checkpoint_help: str, tokenizer_help: str, towers: tuple[str, ...] = (),
                     temperature_help: str = "stage-2 tau stored in the config"):
    """The options every family's converter CLI shares (`--checkpoint`, `--output_dir`, `--tokenizer`,
    `--num_heads TOWER=N` when the family has towers, `--temperature`, `--image_size`, `--push_to_hub`,
    `--overwrite_output_dir`, `--allow_nonfinite_weights`)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer", help=tokenizer_help)
    if towers:
        parser.add_argument("--num_heads", action="append", metavar="TOWER=N",
                            help=f"attention heads of a tower ({' or '.join(towers)}); default: the released "
                                 "models' rule. Repeatable.")
    parser.add_argument("--temperature", type=float, help=temperature_help)
    parser.add_argument("--image_size", type=int, help="assert the checkpoint's input resolution")
    parser.add_argument("--push_to_hub", metavar="REPO_ID")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace --output_dir when it holds a previous output of a converter (never other files)")
    parser.add_argument("--allow_nonfinite_weights", action="store_true",
                        help="convert a checkpoint with NaN/inf weights anyway (a warning naming the keys)")
    return add_debug_flag(parser)
