"""A fifth family that exists only in the tests, to prove that adding one is this folder plus one
`register_family(SPEC)` line: config, model, processor, converter, stage-1 objective and a base it starts from."""

from modeling_spn4cir.cir_contract import CLIP4CIRImageProcessor
from modeling_spn4cir.families import FamilySpec

from .configuration_toy import ToyCIRConfig
from .losses_toy import ToySymmetricLoss
from .modeling_toy import ToyCIRModel
from .processing_toy import ToyCIRProcessor


def _from_clip(name_or_path, options):
    return ToyCIRModel.from_clip(name_or_path, temperature=options.temperature or 0.1)


SPEC = FamilySpec(
    name="toy_cir", title="ToyCIR", config_class=ToyCIRConfig, model_class=ToyCIRModel,
    processor_class=ToyCIRProcessor, image_processor_class=CLIP4CIRImageProcessor, bases={"clip": _from_clip},
    converter=f"{__name__}.convert_toy_original_checkpoint", checkpoint_prefixes=("toy_original.",),
    stage1_losses={"toy_symmetric": ToySymmetricLoss},
)
