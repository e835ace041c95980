"""Convert the toy family's "original" checkpoints (`{"toy_original.words": [V, H], "toy_original.patches.weight":
[H, 3, P, P], "toy_original.patches.bias": [H]}`) into a save_pretrained directory."""

from modeling_spn4cir.conversion_utils import (check_state_dict, conversion_card, converter_parser, load_checkpoint,
                                               run_converter, write_converted)

from . import SPEC
from .configuration_toy import ToyCIRConfig
from .modeling_toy import ToyCIRModel

KEYS = {"toy_original.words": "text_embeddings.weight", "toy_original.patches.weight": "patchify.weight",
        "toy_original.patches.bias": "patchify.bias"}


class OriginalCheckpoint:
    source_format, epoch = "toy_original", None


def read_original_checkpoint(path):
    data = load_checkpoint(path)
    return OriginalCheckpoint(), {KEYS[k]: v for k, v in data.items()}


def convert_original_checkpoint(checkpoint, output_dir, tokenizer=None, temperature=0.1, image_size=32,
                                push_to_hub=None, overwrite_output_dir=False):
    original, state = read_original_checkpoint(checkpoint)
    vocab_size, hidden_size = state["text_embeddings.weight"].shape
    config = ToyCIRConfig(vocab_size=vocab_size, hidden_size=hidden_size, image_size=image_size,
                          patch_size=state["patchify.weight"].shape[-1], temperature=temperature)
    model = ToyCIRModel(config)
    model.load_state_dict(check_state_dict(state, model, SPEC.title))
    card = conversion_card(SPEC.title, [SPEC.name], checkpoint, original, [("hidden size", hidden_size)])
    processor = SPEC.build_processor(config, SPEC.load_tokenizer(tokenizer) if tokenizer else None)
    return write_converted(model, processor, card, output_dir, push_to_hub, overwrite=overwrite_output_dir)


def main(argv=None):
    parser = converter_parser(__doc__, "a toy .pt", "tokenizer to save with the model")
    parser.set_defaults(temperature=0.1, image_size=32)
    run_converter(parser, convert_original_checkpoint, argv)
