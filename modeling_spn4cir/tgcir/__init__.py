"""TG-CIR: CLIP ViT towers with token learners, global masks and the remain-map fusion (Wen et al., MM 2023).
`SPEC` is the family's entry in the registry (`modeling_spn4cir.families`)."""

from ..cir_contract import CLIP4CIRImageProcessor
from ..families import FamilySpec, PaperFacts, fit_context_length
from .configuration_tgcir import TGCIRConfig
from .losses_tgcir import TGCIRStage1Loss
from .modeling_tgcir import TGCIRModel, TGCIROutput, TGCIRPreTrainedModel, TGCIRTokenLearner
from .processing_tgcir import TGCIRProcessor


def _from_clip(name_or_path, options):
    return TGCIRModel.from_clip(name_or_path, **options.temperature_override())


# SPN4CIR's TG-CIR preprocesses with `clip.load`'s transform: CLIP's resize + center crop, whatever is asked.
SPEC = FamilySpec(
    name="tgcir", title="TG-CIR", config_class=TGCIRConfig, model_class=TGCIRModel, processor_class=TGCIRProcessor,
    image_processor_class=CLIP4CIRImageProcessor, bases={"clip": _from_clip}, prepare_tokenizer=fit_context_length,
    preprocessing="resize", default_tokenizer="openai/clip-vit-base-patch16",
    converter=f"{__name__}.convert_tgcir_original_checkpoint", checkpoint_prefixes=("backbone.",),
    stage1_losses={"tgcir": TGCIRStage1Loss},
    paper=PaperFacts(
        backbone_label="ViT-B/16 224px",
        method="TG-CIR", backbone="OpenAI CLIP ViT-B/16", release_folder="tgcir", original_code="TG-CIR",
        stage2_temperature={"fashioniq": 0.02, "cirr": 0.01},
        reported={("fashioniq", 2): (36.84, 60.83, 41.85, 63.89, 45.59, 68.79, 41.43, 64.50, 52.97),
                  ("fashioniq", 1): (35.55, 59.44, 40.24, 62.37, 43.65, 67.36, 39.81, 63.06, 51.44),
                  ("cirr", 2): (47.28, 79.13, 87.98, 97.54, 75.40, 89.78, 95.21, 77.27),
                  ("cirr", 1): (45.23, 78.34, 87.13, 97.30, 72.84, 89.25, 95.13, 75.59)},
    ),
)

__all__ = ["SPEC", "TGCIRConfig", "TGCIRModel", "TGCIROutput", "TGCIRPreTrainedModel", "TGCIRProcessor",
           "TGCIRStage1Loss", "TGCIRTokenLearner"]
