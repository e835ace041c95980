"""The toy family's processor: the shared image processor and any tokenizer."""

from transformers.processing_utils import ProcessorMixin

from modeling_spn4cir.cir_contract import CIRProcessorMixin


class ToyCIRProcessor(CIRProcessorMixin, ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)
