"""A tiny CIR family that exists only to prove the generalized model contract: multi-vector targets `[N, Q, D]`
scored by a max over tokens (like SPRC) and token-level reference features `[N, T, H]` (like TG-CIR / BLIP4CIR)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from modeling_spn4cir.cir_contract import CIRModelMixin


class MultiVectorConfig(PreTrainedConfig):
    model_type = "test_multivector"

    def __init__(self, vocab_size=32, hidden_size=16, projection_dim=8, num_target_tokens=3, patch_size=8,
                 image_size=32, temperature=0.1, **kwargs):
        self.vocab_size, self.hidden_size, self.projection_dim = vocab_size, hidden_size, projection_dim
        self.num_target_tokens, self.patch_size, self.image_size = num_target_tokens, patch_size, image_size
        self.temperature = temperature
        super().__init__(**kwargs)


class MultiVectorModel(CIRModelMixin, PreTrainedModel):
    """Image -> patch tokens `[N, T, H]` (the reference features); targets = the first Q tokens projected and
    normalized `[N, Q, D]`; query = normalize(text + attention-pooled reference tokens) `[B, D]`."""

    config_class = MultiVectorConfig
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        h, d = config.hidden_size, config.projection_dim
        self.patchify = nn.Conv2d(3, h, config.patch_size, config.patch_size)
        self.target_proj = nn.Linear(h, d)
        self.text_embeddings = nn.Embedding(config.vocab_size, h)
        self.text_proj = nn.Linear(h, d)
        self.reference_attention = nn.Linear(h, 1)
        self.reference_proj = nn.Linear(h, d)
        self.post_init()

    def _tokens(self, pixel_values):
        return self.patchify(pixel_values).flatten(2).transpose(1, 2)  # [N, T, H]

    def get_reference_features(self, pixel_values):
        return self._tokens(pixel_values)

    def target_embeds_from_reference_features(self, reference_features):
        return F.normalize(self.target_proj(reference_features[:, : self.config.num_target_tokens]), dim=-1)

    def get_query_embeds(self, input_ids, attention_mask=None, reference_features=None, pixel_values=None):
        if reference_features is None:
            reference_features = self.get_reference_features(pixel_values)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        words = self.text_embeddings(input_ids) * mask[..., None]
        text = self.text_proj(words.sum(1) / mask.sum(1, keepdim=True))
        reference_features = reference_features.to(text.dtype)
        weights = self.reference_attention(reference_features).softmax(dim=1)  # [B, T, 1]
        reference = self.reference_proj((weights * reference_features).sum(1))
        return F.normalize(text + reference, dim=-1)

    def query_side_modules(self):
        return {"text_embeddings": self.text_embeddings, "text_proj": self.text_proj,
                "reference_attention": self.reference_attention, "reference_proj": self.reference_proj}
