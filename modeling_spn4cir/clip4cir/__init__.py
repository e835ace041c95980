"""CLIP4CIR: CLIP dual encoder with sum fusion (SPN4CIR) or CLIP4Cir's Combiner. `SPEC` is the family's entry in
the registry (`modeling_spn4cir.families`)."""

from ..cir_contract import CLIP4CIRImageProcessor
from ..families import FamilySpec, PaperFacts, fit_context_length
from .configuration_clip4cir import CLIP4CIRConfig, CLIP4CIRResNetConfig
from .modeling_clip4cir import CLIP4CIRModel, CLIP4CIROutput, CLIP4CIRPreTrainedModel, Combiner
from .processing_clip4cir import CLIP4CIRProcessor


def _from_clip(name_or_path, options):
    return CLIP4CIRModel.from_clip(name_or_path, fusion=options.fusion, temperature=options.temperature or 0.02)


SPEC = FamilySpec(
    name="clip4cir", title="CLIP4CIR", config_class=CLIP4CIRConfig, model_class=CLIP4CIRModel,
    processor_class=CLIP4CIRProcessor, image_processor_class=CLIP4CIRImageProcessor,
    sub_configs=(CLIP4CIRResNetConfig,), bases={"clip": _from_clip}, prepare_tokenizer=fit_context_length,
    default_tokenizer="openai/clip-vit-base-patch32", converter=f"{__name__}.convert_clip4cir_original_checkpoint",
    checkpoint_prefixes=("clip.", "CLIP", "Combiner", "token_embedding.weight"),
    paper=PaperFacts(
        backbone_label="RN50x4 288px",
        method="CLIP4CIR", backbone="OpenAI CLIP RN50x4 (288 px), sum fusion", release_folder="clip",
        original_code="CLIP4Cir", stage2_temperature={"fashioniq": 0.02, "cirr": 0.02},
        removes_reference=frozenset({("fashioniq", 2)}),  # SPN's CLIP4CIR code deletes it; CLIP4Cir's keeps it
        reported={("fashioniq", 2): (38.82, 62.92, 45.83, 66.44, 48.80, 71.29, 44.48, 66.88, 55.68),
                  ("fashioniq", 1): (38.18, 62.67, 44.01, 64.57, 45.39, 69.56, 42.52, 65.60, 54.06),
                  ("cirr", 2): (45.33, 78.07, 87.61, 98.17, 73.93, 89.28, 95.61, 76.00),
                  ("cirr", 1): (42.80, 75.88, 86.26, 97.64, 70.00, 87.45, 94.99, 72.94)},
        # SPN's zero-shot CLIP4CIR: CLIP ViT-L/14, sum fusion, both stages on generated CC3M triplets (zscir/)
        zero_shot={"SPN-CC (out-of-domain: CC3M, CLIP ViT-L/14)": {"cirr": {"recall@5": 65.42,
                                                                            "recall_subset@1": 64.87}}},
        zero_shot_source="CIRR test server; the Papers-with-Code archive of the paper's zero-shot table (its other "
                         "zero-shot rows are not read here)",
    ),
)

__all__ = ["SPEC", "CLIP4CIRConfig", "CLIP4CIRResNetConfig", "CLIP4CIRModel", "CLIP4CIROutput",
           "CLIP4CIRPreTrainedModel", "CLIP4CIRProcessor", "Combiner"]
