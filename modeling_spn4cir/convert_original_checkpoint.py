"""Convert an original checkpoint of any supported family into a `save_pretrained` directory.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir out [--family F] ...

The family is detected from the checkpoint's keys when `--family` is not given; every other option goes to the
family's converter (`python -m modeling_spn4cir.<family>.convert_<family>_original_checkpoint --help`).
A checkpoint with NaN/inf weights is refused, naming the keys; `--allow_nonfinite_weights` converts it anyway
with a warning.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .conversion_utils import load_checkpoint

# family -> (converter module, top-level / state-dict key prefixes that identify its original checkpoints)
FAMILIES = {
    "clip4cir": ("modeling_spn4cir.clip4cir.convert_clip4cir_original_checkpoint", ("clip.", "CLIP", "Combiner",
                                                                                     "token_embedding.weight")),
    "tgcir": ("modeling_spn4cir.tgcir.convert_tgcir_original_checkpoint", ("backbone.",)),
    "blip4cir": ("modeling_spn4cir.blip4cir.convert_blip4cir_original_checkpoint", ("blip.", "BLIP_Retrieval")),
    "sprc": ("modeling_spn4cir.sprc.convert_sprc_original_checkpoint", ("blip_model.", "Blip2QformerCirAlignPrompt")),
}


def family_from_checkpoint(data: dict) -> str | None:
    """The family whose original format a loaded checkpoint dict is in, from its top-level and `state_dict` keys;
    None when no family's prefixes match."""
    keys = [str(k) for k in data]
    if isinstance(data.get("state_dict"), dict):
        keys += [str(k) for k in data["state_dict"]]
    for family, (_, prefixes) in FAMILIES.items():
        if any(k.startswith(p) for k in keys for p in prefixes):
            return family
    return None


def detect_family(path: str) -> str:
    """The family whose original format `path` is in, from its keys (error naming the keys otherwise)."""
    data = load_checkpoint(path)
    family = family_from_checkpoint(data)
    if family is not None:
        return family
    keys = list(data) + (list(data["state_dict"]) if isinstance(data.get("state_dict"), dict) else [])
    raise ValueError(f"{path}: cannot tell the model family from its keys {keys[:8]}; pass --family "
                     f"({', '.join(FAMILIES)}).")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--family", "--model_type", dest="family", choices=sorted(FAMILIES))
    parser.add_argument("--checkpoint")
    parser.add_argument("--allow_nonfinite_weights", action="store_true")
    known, rest = parser.parse_known_args(argv)
    family = known.family or (detect_family(known.checkpoint) if known.checkpoint else "clip4cir")
    module = importlib.import_module(FAMILIES[family][0])
    module.main(rest + (["--checkpoint", known.checkpoint] if known.checkpoint else [])
                + (["--allow_nonfinite_weights"] if known.allow_nonfinite_weights else []))


if __name__ == "__main__":
    main()
