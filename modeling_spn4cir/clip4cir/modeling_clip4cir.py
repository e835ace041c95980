"""CLIP4CIR: a CLIP dual encoder for composed image retrieval, with sum fusion (SPN4CIR) or CLIP4Cir's Combiner.

Implements the CIR model contract (`get_reference_features`, `target_embeds_from_reference_features`,
`get_query_embeds`, `query_side_modules`; the contract's `forward`, which also returns the fusion's inputs on request).
Self-contained on purpose (relative imports only) so that `save_pretrained` can ship it for `trust_remote_code`
loading.

Parameter names of the CLIP parts equal `transformers.CLIPModel`'s (`text_model.*`, `text_projection`,
`vision_model.*`, `visual_projection`), so a CLIPModel state dict loads into this model unchanged.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel

from .cir_contract import CIRModelMixin, CIRModelOutput, clip_tower_configs, load_base_weights
from .configuration_clip4cir import CLIP4CIRConfig
from .modeling_clip_resnet import AttentionPool2d, ModifiedResNet


@dataclass
class CLIP4CIROutput(CIRModelOutput):
    """
    [`CIRModelOutput`], and with `forward(..., return_fusion_features=True)` the fusion's two inputs, for losses
    that compose other (reference, text) pairs of the batch (the negative types of SPN's study).

    Args:
        reference_features (`torch.FloatTensor` of shape `[B, D]`, *optional*): unnormalized reference features.
        text_features (`torch.FloatTensor` of shape `[B, D]`, *optional*): unnormalized text features.
    """

    reference_features: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None


class Combiner(nn.Module):
    """CLIP4Cir's Combiner (Baldrati et al., CVPR-W 2022 / TOMM 2023), same module names as the original.

    `forward(image_features [B, D], text_features [B, D]) -> [B, D]` L2-normalized: projected, ReLU'd and
    dropped-out text and image features are concatenated; a hidden layer and an output layer give a
    residual, and a sigmoid scalar `s` from the concatenation mixes `s * text + (1 - s) * image`.
    """

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5):
        super().__init__()
        self.text_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(projection_dim * 2, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(projection_dim * 2, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        text_projected = self.dropout1(F.relu(self.text_projection_layer(text_features)))
        image_projected = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        raw_combined = torch.cat((text_projected, image_projected), -1)
        combined = self.dropout3(F.relu(self.combiner_layer(raw_combined)))
        scalar = self.dynamic_scalar(raw_combined)
        output = self.output_layer(combined) + scalar * text_features + (1 - scalar) * image_features
        return F.normalize(output, dim=-1)


class CLIP4CIRPreTrainedModel(CLIPPreTrainedModel):
    """Reuses CLIP's initialization for the CLIP parts and adds the ResNet attention pool."""

    config: CLIP4CIRConfig
    config_class = CLIP4CIRConfig
    base_model_prefix = "clip4cir"
    main_input_name = "input_ids"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "Bottleneck"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AttentionPool2d):
            init.normal_(module.positional_embedding, std=module.positional_embedding.shape[-1] ** -0.5)


class CLIP4CIRModel(CIRModelMixin, CLIP4CIRPreTrainedModel):
    """
    Composed image retrieval with a CLIP dual encoder.

    - target side: image tower (CLIP ViT + `visual_projection`, or the ModifiedResNet whose attention pool
      projects) -> L2-normalized target embeddings `[N, D]`;
    - query side: text tower (CLIP text transformer + `text_projection`) fused with the reference image's
      (unnormalized) features by `config.fusion`: `"sum"` gives normalize(image + text), `"combiner"` the
      Combiner network.

    Stage 2 of SPN freezes the image tower and trains `query_side_parameters()` only.
    """

    def __init__(self, config: CLIP4CIRConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        if config.vision_tower == "resnet":
            self.vision_model = ModifiedResNet(config.vision_config)
            self.visual_projection = None
        else:
            self.vision_model = CLIPVisionModel._from_config(config.vision_config)
            self.visual_projection = nn.Linear(
                config.vision_config.hidden_size, config.projection_dim, bias=False
            )
        self.combiner = None
        if config.fusion == "combiner":
            self.combiner = Combiner(
                config.projection_dim,
                config.combiner_projection_dim,
                config.combiner_hidden_dim,
                config.combiner_dropout,
            )
        self.post_init()

    # ----------------------------------------------------------------------------------------- towers
    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """`input_ids`, `attention_mask`: `[B, L]` -> unnormalized text features `[B, D]` (pooled at EOT)."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values`: `[N, 3, S, S]` -> unnormalized image features `[N, D]`."""
        if self.visual_projection is None:
            return self.vision_model(pixel_values)
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)

    # -------------------------------------------------------------------------------- model contract
    def get_reference_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values`: `[N, 3, S, S]` -> what the fusion consumes: unnormalized image features `[N, D]`."""
        return self.get_image_features(pixel_values)

    def target_embeds_from_reference_features(self, reference_features: torch.Tensor) -> torch.FloatTensor:
        """Unnormalized image features `[N, D]` -> L2-normalized target embeddings `[N, D]`."""
        return F.normalize(reference_features, dim=-1)

    def combine(self, reference_features: torch.Tensor, text_features: torch.Tensor) -> torch.FloatTensor:
        """Fuse `[B, D]` reference features with `[B, D]` text features -> L2-normalized queries `[B, D]`."""
        # The query keeps the model's precision whatever the bank's storage dtype (a bf16 bank must not make an
        # fp32 query, and its loss, bf16).
        reference_features = reference_features.to(text_features.dtype)
        if self.combiner is None:
            return F.normalize(reference_features + text_features, dim=-1)
        return self.combiner(reference_features, text_features)

    def get_fusion_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                            reference_features: torch.Tensor | None = None,
                            pixel_values: torch.FloatTensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What `combine` fuses: the references' features `[B, D]` (from a bank, or encoded from `pixel_values`
        `[B, 3, S, S]`) and the texts' features `[B, D]` of `input_ids`, `attention_mask` `[B, L]`, unnormalized."""
        reference_features = self.reference_features_for(input_ids, reference_features, pixel_values)
        if reference_features.shape[-1] != self.config.projection_dim:
            raise ValueError(
                f"reference_features have dimension {reference_features.shape[-1]}, the model expects "
                f"{self.config.projection_dim}; was the reference bank built with another model?"
            )
        return reference_features, self.get_text_features(input_ids, attention_mask)

    def get_query_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                         reference_features: torch.Tensor | None = None,
                         pixel_values: torch.FloatTensor | None = None) -> torch.FloatTensor:
        """Texts `input_ids`, `attention_mask` `[B, L]` fused with the references' features `[B, D]` (from a bank,
        or encoded from `pixel_values` `[B, 3, S, S]`) -> L2-normalized queries `[B, D]`."""
        return self.combine(*self.get_fusion_features(input_ids, attention_mask, reference_features, pixel_values))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.FloatTensor | None = None, reference_features: torch.Tensor | None = None,
                target_pixel_values: torch.FloatTensor | None = None, target_embeds: torch.Tensor | None = None,
                return_fusion_features: bool = False) -> CLIP4CIROutput:
        """The contract's forward (see `CIRModelMixin.forward`); `return_fusion_features=True` also returns the
        fusion's inputs `reference_features`, `text_features` `[B, D]` ([`CLIP4CIROutput`])."""
        if not return_fusion_features:
            return CLIP4CIROutput(**super().forward(input_ids, attention_mask, pixel_values, reference_features,
                                                    target_pixel_values, target_embeds))
        references, texts = self.get_fusion_features(input_ids, attention_mask, reference_features, pixel_values)
        if target_embeds is None and target_pixel_values is not None:
            target_embeds = self.get_target_embeds(target_pixel_values)
        return CLIP4CIROutput(**self.cir_output(self.combine(references, texts), target_embeds),
                              reference_features=references, text_features=texts)

    def query_side_modules(self) -> dict[str, nn.Module]:
        """The modules stage 2 trains: text tower, its projection and (if any) the Combiner."""
        modules = {"text_model": self.text_model, "text_projection": self.text_projection}
        if self.combiner is not None:
            modules["combiner"] = self.combiner
        return modules

    def get_text_query_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Sum fusion composes without an image: the normalized text feature `[B, D]` (a zero reference)."""
        if self.config.fusion != "sum":
            return super().get_text_query_embeds(input_ids, attention_mask)
        no_image = torch.zeros(input_ids.shape[0], self.config.projection_dim, device=input_ids.device)
        return self.get_query_embeds(input_ids, attention_mask, reference_features=no_image)

    def eval_mode_modules(self) -> list[nn.Module]:
        """As the mixin, plus the CLIP towers unless `config.clip_train_mode`: CLIP4Cir and SPN4CIR train the CLIP in
        eval mode, so BatchNorm (ModifiedResNet) uses and keeps its running statistics. The Combiner follows
        `train()`."""
        modules = super().eval_mode_modules()
        if not self.config.clip_train_mode:
            towers = (self.text_model, self.text_projection, self.vision_model, self.visual_projection)
            modules += [tower for tower in towers if tower is not None]
        return modules

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_clip(
        cls, clip_name_or_path: str, fusion: str = "sum", temperature: float = 0.02, **kwargs
    ) -> "CLIP4CIRModel":
        """
        Build a CLIP4CIR model from any pretrained `transformers.CLIPModel` (a Hub id such as
        `openai/clip-vit-base-patch32`, or a local `save_pretrained` directory), copying both towers and
        both projections. `kwargs` go to [`CLIP4CIRConfig`] (e.g. Combiner sizes); a Combiner starts
        from random weights.
        """
        clip = CLIPModel.from_pretrained(clip_name_or_path)
        model = cls(CLIP4CIRConfig(**clip_tower_configs(clip), fusion=fusion, temperature=temperature, **kwargs))
        state = {k: v for k, v in clip.state_dict().items() if k != "logit_scale"}
        return load_base_weights(model, state, clip_name_or_path, is_new=lambda key: key.startswith("combiner."))


__all__ = ["CLIP4CIRModel", "CLIP4CIRPreTrainedModel", "CLIP4CIROutput", "Combiner"]
