"""The toy family's model: reference features = mean patch features `[N, H]`, targets = their normalization,
query = normalize(mean text embedding + reference) `[B, H]`. It starts from a CLIP (its token embeddings)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel

from modeling_spn4cir.cir_contract import CIRModelMixin, load_base_weights

from .configuration_toy import ToyCIRConfig


class ToyCIRModel(CIRModelMixin, PreTrainedModel):
    config_class = ToyCIRConfig
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.patchify = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
        self.text_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()

    def get_reference_features(self, pixel_values):
        return self.patchify(pixel_values).flatten(2).mean(-1)

    def target_embeds_from_reference_features(self, reference_features):
        return F.normalize(reference_features, dim=-1)

    def get_query_embeds(self, input_ids, attention_mask=None, reference_features=None, pixel_values=None):
        reference = self.reference_features_for(input_ids, reference_features, pixel_values)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        text = (self.text_embeddings(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(text + reference.to(text.dtype), dim=-1)

    def query_side_modules(self):
        return {"text_embeddings": self.text_embeddings}

    @classmethod
    def from_clip(cls, name_or_path, temperature=0.1):
        clip = CLIPModel.from_pretrained(name_or_path)
        text = clip.config.text_config
        config = ToyCIRConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                              image_size=clip.config.vision_config.image_size, temperature=temperature)
        state = {"text_embeddings.weight": clip.text_model.embeddings.token_embedding.weight}
        return load_base_weights(cls(config), state, name_or_path, is_new=lambda key: key.startswith("patchify."))
