"""Load any CIR model and its processor, or wrap a plain CLIP checkpoint as CLIP4CIR."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

from .cir_contract import CIRModelMixin
from .clip4cir import CLIP4CIRImageProcessor, CLIP4CIRModel, CLIP4CIRProcessor


def load_cir_model_and_processor(name_or_path: str, fusion: str = "sum", preprocessing: str = "targetpad",
                                 temperature: float | None = None):
    """-> (model, processor).

    - a CIR checkpoint of any family (`clip4cir`, `tgcir`, `blip4cir`, `sprc`; a converted original checkpoint or
      a CIRTrainer output): loaded as saved, with its processor;
    - a CLIP checkpoint (`model_type` `clip`, e.g. `openai/clip-vit-base-patch32`): wrapped with
      `CLIP4CIRModel.from_clip(fusion=...)`, with its tokenizer and a CLIP4Cir image processor
      (`preprocessing`, at the tower's resolution).
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":
        model = CLIP4CIRModel.from_clip(name_or_path, fusion=fusion, temperature=temperature or 0.02)
        image_processor = CLIP4CIRImageProcessor(preprocessing=preprocessing, size=model.config.image_size)
        processor = CLIP4CIRProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(name_or_path))
    else:
        model = AutoModel.from_pretrained(name_or_path)
        if not isinstance(model, CIRModelMixin):
            raise ValueError(
                f"{name_or_path} is a {config.model_type!r} checkpoint; expected a CIR checkpoint (clip4cir, tgcir, "
                "blip4cir, sprc) or a CLIP checkpoint to wrap."
            )
        processor = AutoProcessor.from_pretrained(name_or_path)
    if temperature is not None:
        model.config.temperature = temperature
    return model, processor
