"""BLIP4CIR: BLIP ViT + BLIP's image-grounded text encoder (SPN4CIR's BLIP backbone, optional "+Bi"). `SPEC` is the
family's entry in the registry (`modeling_spn4cir.families`)."""

from ..cir_contract import CLIP4CIRImageProcessor
from ..families import FamilySpec, PaperFacts, fit_context_length
from .configuration_blip4cir import BLIP4CIRConfig
from .losses_blip4cir import BLIP4CIRBidirectionalLoss
from .modeling_blip4cir import BLIP4CIRModel, BLIP4CIROutput, BLIP4CIRPreTrainedModel
from .processing_blip4cir import BLIP4CIRProcessor, add_blip_special_tokens, build_blip_tokenizer


def _from_blip(name_or_path, options):
    return BLIP4CIRModel.from_blip(name_or_path, bidirectional=options.bidirectional,
                                   **options.temperature_override())


def _fit_blip_tokenizer(tokenizer, config):
    """BLIP's `[DEC]` / `[ENC]` added, truncating at the text encoder's context length."""
    return fit_context_length(add_blip_special_tokens(tokenizer), config)


SPEC = FamilySpec(
    name="blip4cir", title="BLIP4CIR", config_class=BLIP4CIRConfig, model_class=BLIP4CIRModel,
    processor_class=BLIP4CIRProcessor, image_processor_class=CLIP4CIRImageProcessor, bases={"blip": _from_blip},
    load_tokenizer=build_blip_tokenizer, prepare_tokenizer=_fit_blip_tokenizer, default_tokenizer="bert-base-uncased",
    converter=f"{__name__}.convert_blip4cir_original_checkpoint", checkpoint_prefixes=("blip.", "BLIP_Retrieval"),
    stage1_losses={"blip4cir_bidirectional": BLIP4CIRBidirectionalLoss},
    bidirectional_overrides={"bidirectional": True, "stage1_loss": "blip4cir_bidirectional"},
    paper=PaperFacts(
        backbone_label="ViT-B/16 384px",
        method="BLIP4CIR+Bi", backbone="BLIP base (model_base.pth)", release_folder="blip", original_code="BLIP4CIR",
        reported={("fashioniq", 2): (44.52, 67.13, 45.68, 67.96, 50.74, 73.79, 46.98, 69.63, 58.30),
                  ("fashioniq", 1): (44.22, 67.08, 45.00, 66.68, 49.72, 73.02, 46.31, 68.93, 57.62),
                  ("cirr", 2): (46.43, 77.64, 87.01, 97.06, 75.74, 90.07, 95.83, 76.69),
                  ("cirr", 1): (44.77, 76.55, 86.41, 97.18, 74.99, 89.90, 95.59, 75.77)},
    ),
)

__all__ = ["SPEC", "BLIP4CIRBidirectionalLoss", "BLIP4CIRConfig", "BLIP4CIRModel", "BLIP4CIROutput",
           "BLIP4CIRPreTrainedModel", "BLIP4CIRProcessor", "build_blip_tokenizer"]
