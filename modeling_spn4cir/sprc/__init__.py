"""SPRC: BLIP-2's Q-Former for composed image retrieval (SPN4CIR's `blip24cir/`). `SPEC` is the family's entry in
the registry (`modeling_spn4cir.families`)."""

from ..cir_contract import CLIP4CIRImageProcessor
from ..families import FamilySpec, PaperFacts
from .configuration_sprc import SPRCConfig
from .losses_sprc import SPRCStage1Loss
from .modeling_sprc import SPRCModel, SPRCOutput, SPRCPreTrainedModel, SPRCQueryEncoder
from .processing_sprc import SPRCProcessor, build_blip2_tokenizer, pre_caption


def _from_blip2(name_or_path, options):
    return SPRCModel.from_blip2(name_or_path, **options.temperature_override())


# The paper prints SPRC's base FashionIQ Avg R@10 as 54.92 (54.72 by its own categories and Rmean): kept as reported.
SPEC = FamilySpec(
    name="sprc", title="SPRC", config_class=SPRCConfig, model_class=SPRCModel, processor_class=SPRCProcessor,
    image_processor_class=CLIP4CIRImageProcessor, bases={"blip-2": _from_blip2}, load_tokenizer=build_blip2_tokenizer,
    default_tokenizer="bert-base-uncased", converter=f"{__name__}.convert_sprc_original_checkpoint",
    checkpoint_prefixes=("blip_model.", "Blip2QformerCirAlignPrompt"), stage1_losses={"sprc": SPRCStage1Loss},
    paper=PaperFacts(
        backbone_label="ViT-g/14 224px",
        method="SPRC", backbone="BLIP-2 (LAVIS blip2_cir_align_prompt, EVA ViT-g)", release_folder="blip2",
        original_code="SPRC",
        reported={("fashioniq", 2): (50.57, 74.12, 57.70, 75.27, 60.84, 79.96, 56.37, 76.45, 66.41),
                  ("fashioniq", 1): (49.18, 72.43, 55.64, 73.89, 59.35, 78.58, 54.92, 74.97, 64.85),
                  ("cirr", 2): (55.06, 83.83, 90.87, 98.29, 81.54, 92.65, 97.04, 82.69),
                  ("cirr", 1): (51.96, 82.12, 89.74, 97.69, 80.65, 92.31, 96.60, 81.39)},
    ),
)

__all__ = ["SPEC", "SPRCConfig", "SPRCModel", "SPRCOutput", "SPRCPreTrainedModel", "SPRCProcessor", "SPRCQueryEncoder",
           "SPRCStage1Loss", "build_blip2_tokenizer", "pre_caption"]
