"""Convert an original checkpoint of any registered family into a `save_pretrained` directory.

    python -m modeling_spn4cir.convert_original_checkpoint --checkpoint best.pt --output_dir out [--family F] ...

The family is detected from the checkpoint's keys when `--family` is not given (each family's spec says which key
prefixes its original checkpoints have); every other option goes to the family's converter
(`python -m modeling_spn4cir.<family>.convert_<family>_original_checkpoint --help`).
A checkpoint with NaN/inf weights is refused, naming the keys; `--allow_nonfinite_weights` converts it anyway
with a warning.
"""

from __future__ import annotations

import argparse
import sys

from .cli import run_cli
from .conversion_utils import load_checkpoint
from .families import FAMILIES, family, family_of_checkpoint


def family_from_checkpoint(data: dict) -> str | None:
    """The name of the family whose original format a loaded checkpoint dict is in, from its top-level and
    `state_dict` keys; None when no family recognizes them."""
    spec = family_of_checkpoint(data)
    return spec.name if spec is not None else None


def detect_family(path: str) -> str:
    """The family whose original format `path` is in, from its keys (error naming the keys otherwise)."""
    data = load_checkpoint(path)
    name = family_from_checkpoint(data)
    if name is not None:
        return name
    keys = list(data) + (list(data["state_dict"]) if isinstance(data.get("state_dict"), dict) else [])
    raise ValueError(f"{path}: cannot tell the model family from its keys {keys[:8]}; pass --family "
                     f"({', '.join(FAMILIES)}).")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    converters = sorted(name for name, spec in FAMILIES.items() if spec.converter)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--family", "--model_type", dest="family", choices=converters)
    parser.add_argument("--checkpoint")
    parser.add_argument("--allow_nonfinite_weights", action="store_true")
    known, rest = parser.parse_known_args(argv)
    name = known.family or (detect_family(known.checkpoint) if known.checkpoint else next(iter(FAMILIES)))
    family(name).converter_module().main(rest + (["--checkpoint", known.checkpoint] if known.checkpoint else [])
                                         + (["--allow_nonfinite_weights"] if known.allow_nonfinite_weights else []))


if __name__ == "__main__":
    run_cli(main)
