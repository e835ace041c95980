"""SPRC: BLIP-2's Q-Former for composed image retrieval (Bai et al., ICLR 2024), as trained by SPN4CIR (`blip24cir/`).

Built on transformers' BLIP-2 parts (`Blip2VisionModel`, `Blip2QFormerModel`, `Blip2TextEmbeddings`), with the
parameter names of `transformers.Blip2ForImageTextRetrieval` for everything the two share, so a BLIP-2 ITM
checkpoint loads unchanged ([`SPRCModel.from_blip2`]). Self-contained on purpose (relative imports only) so that
`save_pretrained` can ship it for `trust_remote_code` loading.

Scoring (`N` gallery images, `Q` = 32 query tokens, `[CLS]` = text position `Q`):

    t_n = normalize(vision_projection(QF(query_tokens  x-attending  ln_vision(ViT(target_n)))))        [Q, D]
    h_i = QF([query_tokens; text_i], queries x-attending ln_vision(ViT(reference_i)))[:, :Q]         pass 1 (fusion)
    f_i = normalize(text_projection_q(QF_q([h_i; text_i], no image)[:, Q]))                           pass 2
    score[i, n] = max_q f_i . t_n[q]

Pass 2 sends every position, the 32 slots holding `h_i` included, through the text feed-forward of each layer
(SPN4CIR's Q-Former routes by "is there an image", not by query length): `query_length=0` in transformers' terms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2ForImageTextRetrieval, Blip2QFormerModel, Blip2VisionModel
from transformers import initialization as init
from transformers.models.blip_2.modeling_blip_2 import Blip2PreTrainedModel, Blip2TextEmbeddings

from .cir_contract import CIRModelMixin, CIRModelOutput, load_base_weights
from .configuration_sprc import SPRCConfig


@dataclass
class SPRCOutput(CIRModelOutput):
    """
    [`CIRModelOutput`] plus, with `return_stage1_terms=True`, what SPRC's stage-1 objective needs.

    Args:
        fusion_query_hidden (`torch.FloatTensor` of shape `[B, Q, H]`, *optional*):
            Pass-1 fusion states `h_i` of the reference images and captions.
        prompt_text_embeds (`torch.FloatTensor` of shape `[B, D]`, *optional*):
            Text-only queries: `[CLS]` output of the Q-Former on `[CLS] prompt_tokens caption` (no image), projected
            and L2-normalized (the original's `text_only_feat`).
        prompt_tokens (`torch.FloatTensor` of shape `[1, Q, H]`, *optional*):
            The learned prompt tokens (the target of the alignment term, detached by the loss).
        temperature (`torch.FloatTensor` of shape `()`, *optional*):
            SPRC's learnable stage-1 temperature (`temp`).
    """

    fusion_query_hidden: torch.FloatTensor | None = None
    prompt_text_embeds: torch.FloatTensor | None = None
    prompt_tokens: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None


def _not_in_blip2(key: str) -> bool:
    """SPRC's parameters that a BLIP-2 retrieval checkpoint has no weights for."""
    return key in ("prompt_tokens", "temp") or key.startswith("qformer_query.")


class SPRCQueryEncoder(nn.Module):
    """The caption-side copy that SPN's stage 2 trains (the original's `Qformer_query` + `text_proj_q`): text
    embeddings, a Q-Former and the text projection. Its cross-attention and query feed-forward weights exist (the
    original deep-copies the whole Q-Former) but are never used: pass 2 runs without an image."""

    def __init__(self, config: SPRCConfig, copy_from: SPRCModel | None = None):
        super().__init__()
        if copy_from is not None:  # the original's init_stage2: deep copies of the shared modules
            self.embeddings = copy.deepcopy(copy_from.embeddings)
            self.qformer = copy.deepcopy(copy_from.qformer)
            self.text_projection = copy.deepcopy(copy_from.text_projection)
            for parameter in self.parameters():
                parameter.requires_grad_(True)
            return
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.text_projection = nn.Linear(config.qformer_config.hidden_size, config.embed_dim)


class SPRCPreTrainedModel(Blip2PreTrainedModel):
    """BLIP-2's initialization for the BLIP-2 parts, plus SPRC's query / prompt tokens and temperature."""

    config: SPRCConfig
    config_class = SPRCConfig
    base_model_prefix = "sprc"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    # `from_pretrained(..., dtype=torch.bfloat16)` puts the ViT in bf16 and keeps everything else in fp32, as the
    # original (`vit_precision="fp16"`, fp32 `ln_vision` and Q-Former). Patterns are regexes on parameter names.
    _keep_in_fp32_modules_strict = [
        r"^query_tokens$", r"^prompt_tokens$", r"^temp$", r"^embeddings\.", r"^qformer\.", r"^qformer_query\.",
        r"^vision_projection\.", r"^text_projection\.", r"^itm_head\.", r"^vision_model\.post_layernorm\.",
    ]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SPRCModel):
            std = self.config.qformer_config.initializer_range
            init.normal_(module.query_tokens, mean=0.0, std=std)
            init.normal_(module.prompt_tokens, mean=0.0, std=std)
            init.constant_(module.temp, self.config.stage1_temperature)


class SPRCModel(CIRModelMixin, SPRCPreTrainedModel):
    """
    Composed image retrieval with BLIP-2's Q-Former (SPRC).

    - target side: ViT -> `ln_vision` -> Q-Former with the 32 query tokens -> `vision_projection` ->
      L2-normalized target token sets `[N, Q, D]`;
    - reference features: the `ln_vision`'ed ViT tokens `[N, T, W]` of the reference image (what the query side
      consumes; a stage-2 reference bank stores them, so stage 2 never runs the ViT);
    - query side: pass 1 (`qformer`, queries + caption, cross-attending the reference tokens) gives the fusion
      states `h` `[B, Q, H]`; pass 2 (`qformer_query` once SPN's stage 2 has split it off, else `qformer`) reads
      `[h; caption]` without an image; its `[CLS]` output, projected and normalized, is the query `[B, D]`;
    - `similarity` = max over the target's tokens (the contract's 3-D rule).

    SPN's stage 2 (after `untie_query_side`, which makes the copy as the original's `init_stage2`) trains only
    `qformer_query` (its embeddings, Q-Former and text projection).
    """

    def __init__(self, config: SPRCConfig):
        super().__init__(config)
        qformer_config = config.qformer_config
        hidden = qformer_config.hidden_size
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.vision_model.post_layernorm.eps = config.ln_vision_eps  # LAVIS ln_vision: nn.LayerNorm default eps
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel._from_config(qformer_config)
        self.vision_projection = nn.Linear(hidden, config.embed_dim)
        self.text_projection = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)  # kept from BLIP-2 / SPRC checkpoints; unused by retrieval
        self.prompt_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        self.temp = nn.Parameter(torch.tensor(float(config.stage1_temperature)))
        self.qformer_query = None if config.tie_query_side else SPRCQueryEncoder(config)
        self.post_init()
        self.freeze_vision_encoder()

    def freeze_vision_encoder(self) -> None:
        """SPRC's `freeze_vit`: no gradient into the ViT (`ln_vision` = `post_layernorm` stays trainable). Applied
        at construction and again after `from_pretrained` (loading replaces the parameters)."""
        if self.config.freeze_vision_encoder:
            for name, parameter in self.vision_model.named_parameters():
                if not name.startswith("post_layernorm."):
                    parameter.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, SPRCModel):
            model.freeze_vision_encoder()
        return model

    # ------------------------------------------------------------------------------------------ image side
    def get_vision_hidden_states(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values` `[N, 3, S, S]` -> ViT output before `ln_vision` `[N, T, W]`, in the tower's dtype."""
        embeddings = self.vision_model.embeddings(pixel_values)
        return self.vision_model.encoder(inputs_embeds=embeddings).last_hidden_state

    def ln_vision(self, vision_hidden_states: torch.Tensor) -> torch.FloatTensor:
        """LAVIS' `ln_vision`: a LayerNorm computed in fp32 (eps `config.ln_vision_eps`), returned in fp32."""
        norm = self.vision_model.post_layernorm
        return F.layer_norm(vision_hidden_states.float(), norm.normalized_shape, norm.weight.float(),
                            norm.bias.float(), norm.eps)

    def get_image_embeds(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values` `[N, 3, S, S]` -> `ln_vision(ViT(pixel_values))` `[N, T, W]` (fp32)."""
        return self.ln_vision(self.get_vision_hidden_states(pixel_values))

    def get_image_query_output(self, image_embeds: torch.Tensor) -> torch.FloatTensor:
        """Q-Former output of the query tokens cross-attending `image_embeds` `[N, T, W]` -> `[N, Q, H]`."""
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds).last_hidden_state

    def target_embeds_from_image_embeds(self, image_embeds: torch.Tensor) -> torch.FloatTensor:
        """`image_embeds` `[N, T, W]` -> L2-normalized target token sets `[N, Q, D]`."""
        return F.normalize(self.vision_projection(self.get_image_query_output(image_embeds)), dim=-1)

    def get_reference_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values` `[N, 3, S, S]` -> `ln_vision`'ed ViT tokens `[N, T, W]`, what pass 1 cross-attends."""
        return self.get_image_embeds(pixel_values)

    def target_embeds_from_reference_features(self, reference_features: torch.Tensor) -> torch.FloatTensor:
        """`ln_vision`'ed ViT tokens `[N, T, W]` -> L2-normalized target token sets `[N, Q, D]` (`Q` = 32)."""
        return self.target_embeds_from_image_embeds(reference_features)

    # ------------------------------------------------------------------------------------------ query side
    def _joint_attention_mask(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(input_ids.shape[0], self.config.num_query_tokens, dtype=attention_mask.dtype,
                          device=attention_mask.device)
        return torch.cat([ones, attention_mask], dim=1)

    def get_fusion_output(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                          reference_features: torch.Tensor) -> torch.FloatTensor:
        """Pass 1: the Q-Former on `[query_tokens; caption]`, the queries cross-attending the reference tokens
        `[B, T, W]` -> last hidden state `[B, Q + L, H]`."""
        reference_features = self.reference_features_for(input_ids, reference_features)
        if reference_features.ndim != 3 or reference_features.shape[-1] != self.config.vision_config.hidden_size:
            raise ValueError(
                f"reference_features of shape {tuple(reference_features.shape)}; the model expects ViT tokens "
                f"[B, T, {self.config.vision_config.hidden_size}] (was the reference bank built with another model?)"
            )
        query_tokens = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=query_tokens)
        return self.qformer(
            query_embeds=embeds,
            query_length=self.config.num_query_tokens,
            attention_mask=self._joint_attention_mask(input_ids, attention_mask),
            encoder_hidden_states=reference_features,
        ).last_hidden_state

    def get_fusion_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                          reference_features: torch.Tensor | None = None,
                          pixel_values: torch.FloatTensor | None = None) -> torch.FloatTensor:
        """Pass-1 fusion states `h` `[B, Q, H]` of reference images (tokens or pixels) and captions: what the
        original's stage-2 reference bank stores (`get_refer_bank_feats`)."""
        reference_features = self.reference_features_for(input_ids, reference_features, pixel_values,
                                                         "get_fusion_states")
        output = self.get_fusion_output(input_ids, attention_mask, reference_features)
        return output[:, : self.config.num_query_tokens]

    def _query_side(self, use_query_qformer: bool | None):
        use = self.qformer_query is not None if use_query_qformer is None else use_query_qformer
        if not use:
            return self.embeddings, self.qformer, self.text_projection
        if self.qformer_query is None:
            raise ValueError("This model has no separate query-side Q-Former yet: call `model.untie_query_side()` "
                             "first (CIRTrainer does it for --stage candidate_bank).")
        return self.qformer_query.embeddings, self.qformer_query.qformer, self.qformer_query.text_projection

    def get_query_text_output(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                              fusion_states: torch.Tensor, use_query_qformer: bool | None = None) -> torch.FloatTensor:
        """Pass 2: `[fusion_states; caption]` through the query-side Q-Former without an image, every position
        through the text feed-forward -> last hidden state `[B, Q + L, H]`. `use_query_qformer`: `None` = the
        stage-2 copy when the model has one; `False` = the shared Q-Former (the original's `query_type = 0`)."""
        embeddings, qformer, _ = self._query_side(use_query_qformer)
        embeds = embeddings(input_ids=input_ids, query_embeds=fusion_states)
        return qformer(query_embeds=embeds, query_length=0,
                       attention_mask=self._joint_attention_mask(input_ids, attention_mask)).last_hidden_state

    def query_embeds_from_fusion_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                                        fusion_states: torch.Tensor,
                                        use_query_qformer: bool | None = None) -> torch.FloatTensor:
        """Pass 2 + projection of the `[CLS]` output (text position `Q`) -> L2-normalized queries `[B, D]`."""
        if fusion_states.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{fusion_states.shape[0]} fusion states for {input_ids.shape[0]} texts.")
        _, _, projection = self._query_side(use_query_qformer)
        output = self.get_query_text_output(input_ids, attention_mask, fusion_states, use_query_qformer)
        return F.normalize(projection(output[:, self.config.num_query_tokens]), dim=-1)

    def get_query_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                         reference_features: torch.Tensor | None = None, pixel_values: torch.FloatTensor | None = None,
                         fusion_states: torch.Tensor | None = None) -> torch.FloatTensor:
        """Texts `input_ids`, `attention_mask` `[B, L]` (the SPRC processor pads to 32) composed with the references'
        ViT tokens `[B, T, W]` (from a bank, or encoded from `pixel_values` `[B, 3, S, S]`) -> L2-normalized queries
        `[B, D]`. `fusion_states` `[B, Q, H]`: precomputed pass-1 states (the original's stage-2 `refer_bank`);
        pass 1 is then skipped."""
        if fusion_states is None:
            fusion_states = self.get_fusion_states(input_ids, attention_mask, reference_features, pixel_values)
        return self.query_embeds_from_fusion_states(input_ids, attention_mask, fusion_states)

    def get_prompt_text_embeds(self, input_ids: torch.LongTensor,
                               attention_mask: torch.Tensor | None = None) -> torch.FloatTensor:
        """SPRC's text-only query (stage-1 `loss_rtc`): `[CLS] prompt_tokens caption[1:]`, position embeddings
        over all `L + Q` positions, the shared Q-Former without image -> normalized `text_projection([CLS])`."""
        batch, length = input_ids.shape
        num_query = self.config.num_query_tokens
        words = self.embeddings.word_embeddings(input_ids)
        prompts = self.prompt_tokens.expand(batch, -1, -1).to(words.dtype)
        embeds = torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1)
        embeds = embeds + self.embeddings.position_embeddings(self.embeddings.position_ids[:, : length + num_query])
        # The mask is cat(ones(Q), text mask): with [CLS] (always attended) first, it lines up with the tokens.
        output = self.qformer(query_embeds=embeds, query_length=0,
                              attention_mask=self._joint_attention_mask(input_ids, attention_mask)).last_hidden_state
        return F.normalize(self.text_projection(output[:, 0]), dim=-1)

    # ----------------------------------------------------------------------------------------------- stages
    def untie_query_side(self) -> None:
        """SPN's stage-2 preparation, the original's `init_stage2`: split the caption-side pass off into a trainable
        copy (`qformer_query`) of the text embeddings, the Q-Former and `text_projection`, recorded as
        `config.tie_query_side = False`. No-op when the model already has it."""
        if self.qformer_query is not None:
            return
        self.qformer_query = SPRCQueryEncoder(self.config, copy_from=self)
        self.config.tie_query_side = False

    def has_own_query_side(self) -> bool:
        """Only once `untie_query_side()` has made the caption-side copy: before, the Q-Former serves both sides."""
        return self.qformer_query is not None

    def query_side_modules(self) -> dict[str, nn.Module]:
        """What SPN's stage 2 trains: the caption-side copy (`Qformer_query` + `text_proj_q` in the original)."""
        if not self.has_own_query_side():
            raise RuntimeError("SPRC's stage 2 trains a copy of the caption-side Q-Former that this model does not "
                               "have yet: call `model.untie_query_side()` first (CIRTrainer does it for --stage "
                               "candidate_bank).")
        return {"qformer_query": self.qformer_query}

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.FloatTensor | None = None, reference_features: torch.Tensor | None = None,
                target_pixel_values: torch.FloatTensor | None = None, target_embeds: torch.Tensor | None = None,
                fusion_states: torch.Tensor | None = None, return_stage1_terms: bool = False) -> SPRCOutput:
        """The contract's forward (`reference_features` `[B, T, W]` or pass-1 `fusion_states` `[B, Q, H]`, the
        original's stage-2 reference bank; `target_embeds` `[B_t, Q, D]`) as an [`SPRCOutput`]; with
        `return_stage1_terms`, also what SPRC's stage-1 objective needs (`losses_sprc`). No loss is computed here."""
        if fusion_states is None:
            fusion_states = self.get_fusion_states(input_ids, attention_mask, reference_features, pixel_values)
        query_embeds = self.query_embeds_from_fusion_states(input_ids, attention_mask, fusion_states)
        if target_embeds is None and target_pixel_values is not None:
            target_embeds = self.get_target_embeds(target_pixel_values)
        base = self.cir_output(query_embeds, target_embeds)
        output = SPRCOutput(logits=base.logits, query_embeds=query_embeds, target_embeds=target_embeds)
        if return_stage1_terms:
            output.fusion_query_hidden = fusion_states
            output.prompt_text_embeds = self.get_prompt_text_embeds(input_ids, attention_mask)
            output.prompt_tokens = self.prompt_tokens
            output.temperature = self.temp
        return output

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_blip2(cls, blip2_name_or_path: str, temperature: float = 0.05, **kwargs) -> SPRCModel:
        """
        Start SPRC (stage 1) from a BLIP-2 image-text retrieval checkpoint in `transformers.Blip2ForImageTextRetrieval`'s
        layout (e.g. `Salesforce/blip2-itm-vit-g`, or a local `save_pretrained` directory): ViT, `ln_vision`, query
        tokens, Q-Former (text FFNs included), projections and ITM head are copied; `prompt_tokens` start from
        N(0, 0.02) and the learnable `temp` from `stage1_temperature`, as in SPRC (the HF layout keeps no `temp`).
        `kwargs` go to [`SPRCConfig`].
        """
        blip = Blip2ForImageTextRetrieval.from_pretrained(blip2_name_or_path)
        if not blip.config.qformer_config.use_qformer_text_input:
            raise ValueError(f"{blip2_name_or_path!r} has no Q-Former text feed-forward (use_qformer_text_input="
                             "False); SPRC needs a BLIP-2 ITM / first-stage checkpoint.")
        config = SPRCConfig(
            vision_config=blip.config.vision_config.to_dict(),
            qformer_config=blip.config.qformer_config.to_dict(),
            num_query_tokens=blip.config.num_query_tokens,
            embed_dim=blip.config.image_text_hidden_size,
            temperature=temperature,
            **kwargs,
        )
        model = load_base_weights(cls(config), blip.state_dict(), blip2_name_or_path, _not_in_blip2)
        if not model.config.tie_query_side:  # an untied model asked for: start the copy from the shared Q-Former
            model.qformer_query = None
            model.config.tie_query_side = True
            model.untie_query_side()
        return model


__all__ = ["SPRCModel", "SPRCOutput", "SPRCPreTrainedModel", "SPRCQueryEncoder"]
