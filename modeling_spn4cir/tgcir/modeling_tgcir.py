"""TG-CIR (target-guided composed image retrieval, Wen et al., ACM MM 2023) as trained by SPN4CIR.

Both modalities become `P + Q` tokens in a joint space of dimension D:
- P global tokens: the projected CLIP embedding times `relu(masks.weight[p])` (learned channel masks);
- Q local tokens: a token learner over `fc(last_hidden_state)` of every position (CLS and padding included):
  token q = mean over positions of `z * sigmoid(z @ w_q + b_q)`.
A target image is `normalize(mean(tokens))`; a query fuses reference-image tokens `r` and text tokens `t` per token
with the student remain map `m = s_remain_map([r, t])`: `normalize(mean(m * r + (1 - m) * t))`.

Implements the CIR model contract: reference features = the `[N, P + Q, D]` image tokens (SPN's stage 2 caches them),
target embeddings = the pooled tokens, `similarity` = dot product. Self-contained (relative imports only) so that
`save_pretrained` ships it for `trust_remote_code` loading. The CLIP towers are transformers' `CLIPTextModel` /
`CLIPVisionModel` with CLIPModel's parameter names (`text_model.*`, `text_projection`, `vision_model.*`,
`visual_projection`); the TG-CIR modules keep the original names (`fc`, `text_fc`, `tokenlearn`, `masks`, ...).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel

from .cir_contract import CIRModelMixin, CIRModelOutput, clip_tower_configs, load_base_weights
from .configuration_tgcir import TGCIRConfig


@dataclass
class TGCIROutput(CIRModelOutput):
    """
    [`CIRModelOutput`] plus, with `return_stage1_terms=True`, what TG-CIR's stage-1 objective needs
    (`losses_tgcir.TGCIRStage1Loss`).

    Args:
        reference_tokens, text_tokens, target_tokens (`[B, P + Q, D]`): tokens of the three inputs.
        remain_mask (`[B, P + Q, 1]`): student remain map `s_remain_map([reference, text])`.
        teacher_remain_mask, teacher_replace_mask (`[B, P + Q, 1]`): `t_remain_map([reference, target])`,
            `t_replace_map([text, target])` (reference and text tokens detached, as in the original).
        teacher_fused_tokens (`[B, P + Q, D]`): `teacher_remain * reference + teacher_replace * text`.
        local_weight (`[P + Q]`), stage1_logit_scale (`[1]`): the learnable per-token weights and logit scale
            (the original's `local_weight`, `loss_T`), passed through so that the loss trains them.
    """

    reference_tokens: torch.FloatTensor | None = None
    text_tokens: torch.FloatTensor | None = None
    target_tokens: torch.FloatTensor | None = None
    remain_mask: torch.FloatTensor | None = None
    teacher_remain_mask: torch.FloatTensor | None = None
    teacher_replace_mask: torch.FloatTensor | None = None
    teacher_fused_tokens: torch.FloatTensor | None = None
    local_weight: torch.FloatTensor | None = None
    stage1_logit_scale: torch.FloatTensor | None = None


class TGCIRSpatialAttention(nn.Module):
    """One token of the token learner: `conv.0` = Conv1d(D, 1, 1) (a per-position linear score), sigmoid.

    `forward(x [B, L, D]) -> (token [B, D], weights [B, L])`, token = mean over L of `x * weights` (divided by L,
    not by the sum of the weights, as the original)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(dim, 1, kernel_size=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.conv(x.transpose(1, 2))  # [B, 1, L]
        token = (x.transpose(1, 2) * weights).mean(dim=-1)
        return token, weights.squeeze(1)


class TGCIRTokenLearner(nn.Module):
    """Q spatial attentions: `forward(x [B, L, D]) -> (tokens [B, Q, D], weights [B, Q, L])`."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.tokenizers = nn.ModuleList([TGCIRSpatialAttention(dim) for _ in range(num_tokens)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, weights = zip(*(tokenizer(x) for tokenizer in self.tokenizers))
        return torch.stack(tokens, dim=1), torch.stack(weights, dim=1)


def _mask_map(dim: int) -> nn.Sequential:
    """TG-CIR's per-token gate: Linear(2D, D) -> ReLU -> Linear(D, 1) -> Sigmoid."""
    return nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1), nn.Sigmoid())


class TGCIRPreTrainedModel(CLIPPreTrainedModel):
    """CLIP's initialization for the towers; TG-CIR's for its masks, token weights and stage-1 logit scale."""

    config: TGCIRConfig
    config_class = TGCIRConfig
    base_model_prefix = "tgcir"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TGCIRModel):
            for masks in (module.masks, module.masks_text):
                init.copy_(masks.weight, tgcir_initial_masks(*masks.weight.shape))
            init.ones_(module.local_weight)
            init.constant_(module.stage1_logit_scale, self.config.stage1_logit_scale_init)


def tgcir_initial_masks(num_global_tokens: int, dim: int) -> torch.Tensor:
    """The original's mask initialization: 0.1 everywhere, 1.0 on block `p` of width `dim // P` for token p."""
    masks = torch.full((num_global_tokens, dim), 0.1)
    width = dim // num_global_tokens
    for p in range(num_global_tokens):
        masks[p, p * width : (p + 1) * width] = 1.0
    return masks


class TGCIRModel(CIRModelMixin, TGCIRPreTrainedModel):
    """
    TG-CIR on transformers' CLIP towers.

    - target side: CLIP ViT (+ `visual_projection`), `fc`, `tokenlearn`, `masks` -> image tokens
      `[N, P + Q, D]`; target embeddings = L2-normalized mean of the tokens `[N, D]`.
    - query side: CLIP text transformer (+ `text_projection`), `text_fc`, `tokenlearn_text`, `masks_text` -> text
      tokens, fused with the reference tokens by `s_remain_map` -> L2-normalized queries `[B, D]`.
    - stage-1-only parts: `t_remain_map`, `t_replace_map`, `local_weight`, `stage1_logit_scale` (teacher branch).

    Stage 2 of SPN freezes the image side and trains `query_side_parameters()` only.
    """

    def __init__(self, config: TGCIRConfig):
        super().__init__(config)
        dim = config.projection_dim
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, dim, bias=False)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, dim, bias=False)
        self.fc = nn.Linear(config.vision_config.hidden_size, dim)
        self.text_fc = nn.Linear(config.text_config.hidden_size, dim)
        self.tokenlearn = TGCIRTokenLearner(config.num_local_tokens, dim)
        self.tokenlearn_text = TGCIRTokenLearner(config.num_local_tokens, dim)
        self.masks = nn.Embedding(config.num_global_tokens, dim)
        self.masks_text = nn.Embedding(config.num_global_tokens, dim)
        self.s_remain_map = _mask_map(dim)
        self.t_remain_map = _mask_map(dim)
        self.t_replace_map = _mask_map(dim)
        self.local_weight = nn.Parameter(torch.ones(config.num_tokens))
        self.stage1_logit_scale = nn.Parameter(torch.tensor([config.stage1_logit_scale_init]))
        self.post_init()

    # ----------------------------------------------------------------------------------------- towers
    def _text_side(self) -> tuple[TGCIRTokenLearner, nn.Embedding]:
        if self.config.tie_query_side:
            return self.tokenlearn, self.masks
        return self.tokenlearn_text, self.masks_text

    @staticmethod
    def _tokens(global_embeds, hidden, fc, token_learner, masks, details: dict | None, prefix: str):
        global_tokens = global_embeds[:, None, :] * F.relu(masks.weight)[None]  # [B, P, D]
        fc_tokens = fc(hidden)
        local_tokens, weights = token_learner(fc_tokens)  # [B, Q, D], [B, Q, L]
        if details is not None:
            details.update({f"{prefix}_fc_tokens": fc_tokens, f"{prefix}_tokenlearner_weights": weights})
        return torch.cat([global_tokens, local_tokens], dim=1)

    def encode_image(self, pixel_values: torch.FloatTensor, output_details: bool = False):
        """`pixel_values` `[N, 3, S, S]` -> image tokens `[N, P + Q, D]` (and, with `output_details`, a dict of
        the intermediate tensors: `vision_last_hidden`, `image_embeds`, `image_fc_tokens`,
        `image_tokenlearner_weights`)."""
        out = self.vision_model(pixel_values=pixel_values)
        hidden = out.last_hidden_state  # before post_layernorm, CLS at 0
        image_embeds = self.visual_projection(out.pooler_output)  # post_layernorm(CLS) @ proj
        details = {"vision_last_hidden": hidden, "image_embeds": image_embeds} if output_details else None
        tokens = self._tokens(image_embeds, hidden, self.fc, self.tokenlearn, self.masks, details, "image")
        return (tokens, details) if output_details else tokens

    def encode_text(self, input_ids: torch.LongTensor, output_details: bool = False):
        """`input_ids` `[B, L]` -> text tokens `[B, P + Q, D]`. The text transformer runs WITHOUT an attention
        mask (causal mask only), as the original: padding positions are attended to and averaged into the
        local tokens, so the padding length is part of the input (the original pads to 77)."""
        out = self.text_model(input_ids=input_ids)
        hidden = out.last_hidden_state  # after final_layer_norm
        text_embeds = self.text_projection(out.pooler_output)
        details = {"text_last_hidden": hidden, "text_embeds": text_embeds} if output_details else None
        token_learner, masks = self._text_side()
        tokens = self._tokens(text_embeds, hidden, self.text_fc, token_learner, masks, details, "text")
        return (tokens, details) if output_details else tokens

    @staticmethod
    def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
        """`[N, P + Q, D]` -> `normalize(mean over tokens)` `[N, D]`."""
        return F.normalize(tokens.mean(dim=1), dim=-1)

    def get_remain_mask(self, reference_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Student remain map `[B, P + Q, 1]` = `s_remain_map(cat([reference, text], -1))`."""
        return self.s_remain_map(torch.cat([reference_tokens, text_tokens.to(reference_tokens.dtype)], dim=-1))

    def fuse(self, reference_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """`normalize(mean(m * reference + (1 - m) * text))` with `m = get_remain_mask(...)` -> `[B, D]`."""
        text_tokens = text_tokens.to(reference_tokens.dtype)
        remain = self.get_remain_mask(reference_tokens, text_tokens)
        return self.pool_tokens(remain * reference_tokens + (1 - remain) * text_tokens)

    # -------------------------------------------------------------------------------- model contract
    def get_reference_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values` `[N, 3, S, S]` -> the reference tokens the fusion consumes, `[N, P + Q, D]`."""
        return self.encode_image(pixel_values)

    def target_embeds_from_reference_features(self, reference_features: torch.Tensor) -> torch.FloatTensor:
        """Image tokens `[N, P + Q, D]` -> L2-normalized target embeddings `[N, D]` (pooled tokens)."""
        return self.pool_tokens(reference_features)

    def get_query_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                         reference_features: torch.Tensor | None = None,
                         pixel_values: torch.FloatTensor | None = None) -> torch.FloatTensor:
        """Texts `input_ids` `[B, L]` fused with the references' tokens `[B, P + Q, D]` (from a bank, or encoded
        from `pixel_values` `[B, 3, S, S]`) -> L2-normalized queries `[B, D]`. `attention_mask` is accepted for the
        common interface and NOT used: the original text tower has no padding mask (see `encode_text`)."""
        reference_features = self.reference_features_for(input_ids, reference_features, pixel_values)
        expected = (self.config.num_tokens, self.config.projection_dim)
        if reference_features.ndim != 3 or tuple(reference_features.shape[1:]) != expected:
            raise ValueError(
                f"reference_features have shape {tuple(reference_features.shape)}, TG-CIR expects [B, "
                f"{expected[0]}, {expected[1]}] tokens; was the reference bank built with another model?"
            )
        return self.fuse(reference_features, self.encode_text(input_ids))

    def query_side_modules(self) -> dict[str, nn.Module]:
        """What SPN4CIR's stage 2 trains (gets gradient): the text tower and its projection, `text_fc`, the text
        token learner and masks, and `s_remain_map`."""
        return {
            "text_model": self.text_model,
            "text_projection": self.text_projection,
            "text_fc": self.text_fc,
            "tokenlearn_text": self.tokenlearn_text,
            "masks_text": self.masks_text,
            "s_remain_map": self.s_remain_map,
        }

    def untie_query_side(self) -> None:
        """SPN's stage-2 preparation: give the text side its own copies of the image token learner and masks (the
        original's `load_ckpt(..., is_origin=True)` at the start of stage 2), recorded as
        `config.tie_query_side = False`; no-op when already untied."""
        if self.config.tie_query_side:
            with torch.no_grad():
                self.tokenlearn_text.load_state_dict(self.tokenlearn.state_dict())
                self.masks_text.load_state_dict(self.masks.state_dict())
            self.config.tie_query_side = False

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.FloatTensor | None = None, reference_features: torch.Tensor | None = None,
                target_pixel_values: torch.FloatTensor | None = None, target_embeds: torch.Tensor | None = None,
                return_stage1_terms: bool = False) -> TGCIROutput:
        """The contract's forward (`reference_features` `[B, P + Q, D]`, `target_embeds` `[B_t, D]`; `attention_mask`
        is ignored, see `encode_text`) as a [`TGCIROutput`]; with `return_stage1_terms`, also what TG-CIR's stage-1
        objective needs (reference and target pixels, row i of each belonging to text i). No loss is computed here."""
        if not return_stage1_terms:
            return TGCIROutput(**super().forward(input_ids, attention_mask, pixel_values, reference_features,
                                                 target_pixel_values, target_embeds))

        if target_pixel_values is None or (reference_features is None and pixel_values is None):
            raise ValueError("return_stage1_terms needs reference pixel_values and target_pixel_values.")
        reference_tokens = reference_features if reference_features is not None else self.encode_image(pixel_values)
        text_tokens = self.encode_text(input_ids)
        target_tokens = self.encode_image(target_pixel_values)
        remain = self.get_remain_mask(reference_tokens, text_tokens)
        query_embeds = self.pool_tokens(remain * reference_tokens + (1 - remain) * text_tokens)
        target_embeds = self.pool_tokens(target_tokens)
        # Teacher (target-guided) branch: the original detaches the reference and text tokens here.
        reference_detached, text_detached = reference_tokens.detach(), text_tokens.detach()
        teacher_remain = self.t_remain_map(torch.cat([reference_detached, target_tokens], dim=-1))
        teacher_replace = self.t_replace_map(torch.cat([text_detached, target_tokens], dim=-1))
        output = self.cir_output(query_embeds, target_embeds)
        return TGCIROutput(
            **output,
            reference_tokens=reference_tokens,
            text_tokens=text_tokens,
            target_tokens=target_tokens,
            remain_mask=remain,
            teacher_remain_mask=teacher_remain,
            teacher_replace_mask=teacher_replace,
            teacher_fused_tokens=teacher_remain * reference_detached + teacher_replace * text_detached,
            local_weight=self.local_weight,
            stage1_logit_scale=self.stage1_logit_scale,
        )

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_clip(
        cls,
        clip_name_or_path: str,
        num_global_tokens: int = 4,
        num_local_tokens: int = 8,
        temperature: float = 0.02,
        tie_query_side: bool = True,
        **kwargs,
    ) -> "TGCIRModel":
        """
        A TG-CIR model on any pretrained `transformers.CLIPModel` (Hub id or local directory) with a ViT image
        tower: both towers and projections are copied, the TG-CIR modules start from their initialization
        (masks as the original). `tie_query_side=True` (default) is the original stage-1 model, whose
        text side uses the image token learner and masks; `untie_query_side()` unties them for stage 2.
        `kwargs` go to [`TGCIRConfig`].
        """
        clip = CLIPModel.from_pretrained(clip_name_or_path)
        config = TGCIRConfig(**clip_tower_configs(clip), num_global_tokens=num_global_tokens,
                             num_local_tokens=num_local_tokens, temperature=temperature, tie_query_side=tie_query_side,
                             **kwargs)
        model = cls(config)
        state = {k: v for k, v in clip.state_dict().items() if k != "logit_scale"}
        clip_parts = ("text_model.", "text_projection.", "vision_model.", "visual_projection.")
        load_base_weights(model, state, clip_name_or_path, is_new=lambda key: not key.startswith(clip_parts))
        with torch.no_grad():  # the text copies start equal to the image side (as the original's deepcopy)
            model.tokenlearn_text.load_state_dict(model.tokenlearn.state_dict())
            model.masks_text.load_state_dict(model.masks.state_dict())
        return model


__all__ = ["TGCIRModel", "TGCIROutput", "TGCIRPreTrainedModel", "TGCIRTokenLearner", "tgcir_initial_masks"]
