"""BLIP4CIR: composed image retrieval with BLIP's image-grounded text encoder (SPN4CIR's BLIP backbone).

- target side: BLIP ViT -> `normalize(vision_proj(ViT(img)[:, 0]))` `[N, E]` (the ViT's last hidden state
  after its final LayerNorm, *not* transformers' `pooler_output`, which applies that LayerNorm a second time);
- query side: BLIP's BERT text encoder with `[ENC]` in place of `[CLS]`, bidirectional self-attention and
  cross-attention to every ViT token of the reference image -> `normalize(text_proj(H[:, 0]))` `[B, E]`;
- score: dot product; a learnable temperature `tau` (SPN stage 2 trains the text encoder, `text_proj`, `tau`).

Reference features are the reference image's ViT token states `[N, T, H]`: stage 2 reads them from a bank.
Parameter names equal `transformers.BlipForImageTextRetrieval`'s (`vision_model.*`, `text_encoder.*`,
`vision_proj`, `text_proj`), so its state dict loads unchanged ([`BLIP4CIRModel.from_blip`]).

Self-contained on purpose (relative imports only) so that `save_pretrained` ships it for `trust_remote_code`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextModel, BlipVisionModel, PreTrainedModel
from transformers import initialization as init

from .cir_contract import CIRModelMixin, CIRModelOutput, load_base_weights
from .configuration_blip4cir import BLIP4CIRConfig


@dataclass
class BLIP4CIROutput(CIRModelOutput):
    """
    [`CIRModelOutput`] plus what BLIP4CIR's losses need from the forward pass (so they work under DDP).

    Args:
        temperature (`torch.FloatTensor` of shape `()`):
            The learnable temperature `tau` (part of the autograd graph: a loss dividing by it trains it).
        reverse_query_embeds (`torch.FloatTensor` of shape `[B, E]`, *optional*):
            "+Bi" reversed queries: target image tokens + reversal token + modification text (only with
            `return_reverse_terms=True` and `config.bidirectional`).
        reference_embeds (`torch.FloatTensor` of shape `[B, E]`, *optional*):
            `normalize(vision_proj(reference CLS))`: what the reversed queries must retrieve.
    """

    temperature: torch.FloatTensor | None = None
    reverse_query_embeds: torch.FloatTensor | None = None
    reference_embeds: torch.FloatTensor | None = None


class BLIP4CIRPreTrainedModel(PreTrainedModel):
    config: BLIP4CIRConfig
    config_class = BLIP4CIRConfig
    base_model_prefix = "blip4cir"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlipEncoderLayer", "BlipTextLayer", "BlipTextEmbeddings"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BLIP4CIRModel):
            init.constant_(module.tau, self.config.temperature)
            if module.reversal_token is not None:
                init.normal_(module.reversal_token, std=self.config.initializer_range)


class BLIP4CIRModel(CIRModelMixin, BLIP4CIRPreTrainedModel):
    """
    Composed image retrieval with BLIP (SPN4CIR's BLIP4CIR).

    Stage 2 of SPN freezes the ViT and `vision_proj` and trains `query_side_parameters()`: the whole text
    encoder (embeddings, self- and cross-attention, FFN), `text_proj` and `tau`.
    """

    def __init__(self, config: BLIP4CIRConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel._from_config(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.tau = nn.Parameter(torch.tensor(float(config.temperature)))
        self.reversal_token = (
            nn.Parameter(torch.zeros(config.text_config.hidden_size)) if config.bidirectional else None
        )
        self.post_init()

    # ----------------------------------------------------------------------------------------- towers
    def get_image_tokens(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values` `[N, 3, S, S]` -> ViT token states `[N, T, Hv]` (after the ViT's final LayerNorm)."""
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def project_image_tokens(self, image_tokens: torch.Tensor) -> torch.FloatTensor:
        """ViT tokens `[N, T, Hv]` -> L2-normalized image embeddings `[N, E]` (`vision_proj` of the CLS token)."""
        cls = image_tokens[:, 0, :].to(self.vision_proj.weight.dtype)
        return F.normalize(self.vision_proj(cls), dim=-1)

    def encode_text(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
        reverse: bool = False,
        output_hidden_states: bool = False,
    ):
        """BLIP's image-grounded text encoder (med.py `mode='multimodal'`): `[ENC]` at position 0, bidirectional
        self-attention over the text, cross-attention to every token of `image_tokens` `[B, T, Hv]`.
        With `reverse=True` the learnable reversal token is inserted after `[ENC]`. Returns the
        `BlipTextModel` output (`last_hidden_state` `[B, L(+1), Ht]`)."""
        if self.config.enc_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.enc_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dtype = self.text_proj.weight.dtype
        image_tokens = image_tokens.to(device=input_ids.device, dtype=dtype)
        inputs = {"input_ids": input_ids}
        if reverse:
            if self.reversal_token is None:
                raise ValueError("Reversed queries need the reversal token: build the model with bidirectional=True.")
            words = self.text_encoder.embeddings.word_embeddings(input_ids)
            token = self.reversal_token.to(words.dtype).expand(words.shape[0], 1, -1)
            inputs = {"inputs_embeds": torch.cat([words[:, :1], token, words[:, 1:]], dim=1)}
            attention_mask = torch.cat([attention_mask[:, :1], torch.ones_like(attention_mask[:, :1]),
                                        attention_mask[:, 1:]], dim=1)
        return self.text_encoder(
            **inputs,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=None,  # every image token is attended (the original's all-ones mask)
            is_decoder=False,
            output_hidden_states=output_hidden_states,
        )

    # -------------------------------------------------------------------------------- model contract
    def get_reference_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`pixel_values` `[N, 3, S, S]` -> what the query side consumes: ViT token states `[N, T, Hv]`."""
        return self.get_image_tokens(pixel_values)

    def target_embeds_from_reference_features(self, reference_features: torch.Tensor) -> torch.FloatTensor:
        """ViT token states `[N, T, Hv]` -> L2-normalized target embeddings `[N, E]`."""
        return self.project_image_tokens(reference_features)

    def get_query_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                         reference_features: torch.Tensor | None = None, pixel_values: torch.FloatTensor | None = None,
                         reverse: bool = False) -> torch.FloatTensor:
        """Texts `input_ids`, `attention_mask` `[B, L]` (position 0 is set to `[ENC]`) encoded against the references'
        ViT tokens `[B, T, Hv]` (from a bank, any dtype, or encoded from `pixel_values` `[B, 3, S, S]`) ->
        `normalize(text_proj(H[:, 0]))` `[B, E]`. `reverse`: mark the texts as reversed with the learnable reversal
        token ("+Bi"; needs `bidirectional`)."""
        reference_features = self.reference_features_for(input_ids, reference_features, pixel_values)
        self._check_reference_features(reference_features)
        hidden = self.encode_text(input_ids, attention_mask, reference_features, reverse=reverse).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0, :]), dim=-1)

    def _check_reference_features(self, reference_features: torch.Tensor) -> None:
        width = self.config.vision_config.hidden_size
        if reference_features.ndim != 3 or reference_features.shape[-1] != width:
            raise ValueError(
                f"reference_features have shape {tuple(reference_features.shape)}, BLIP4CIR expects ViT tokens "
                f"[B, T, {width}]; was the reference bank built with another model?"
            )

    def get_temperature(self) -> torch.Tensor:
        """The learnable temperature `tau` (a 0-dim parameter in the graph)."""
        return self.tau

    def query_side_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """What SPN's stage 2 trains: the whole text encoder, `text_proj` and `tau`. (The "+Bi" reversal token
        is a stage-1 parameter: stage 2 has no reversed queries, so it stays frozen there.)"""
        return {"text_encoder": self.text_encoder, "text_proj": self.text_proj, "tau": self.tau}

    def eval_mode_modules(self) -> list[nn.Module]:
        """As the mixin; in stage 2 (after `freeze_target_side()`) every submodule, unless `config.stage2_dropout`:
        SPN4CIR's train.py calls `model.blip.eval()` before its stage-2 steps."""
        if self.target_side_frozen and not self.config.stage2_dropout:
            return list(self.children())
        return super().eval_mode_modules()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.FloatTensor | None = None, reference_features: torch.Tensor | None = None,
                target_pixel_values: torch.FloatTensor | None = None, target_embeds: torch.Tensor | None = None,
                return_reverse_terms: bool = False) -> BLIP4CIROutput:
        """The contract's forward (`reference_features` `[B, T, Hv]`, `target_embeds` `[B_t, E]`) as a
        [`BLIP4CIROutput`] carrying `temperature` (`tau`; logits are `similarity / tau`). `return_reverse_terms`:
        with `config.bidirectional`, also the "+Bi" reversed queries (target tokens + reversal token + text; needs
        `target_pixel_values`) and the reference embeddings. No loss: the losses are loss modules."""
        reference_features = self.reference_features_for(input_ids, reference_features, pixel_values, "forward")
        query_embeds = self.get_query_embeds(input_ids, attention_mask, reference_features=reference_features)
        target_tokens = None
        if target_embeds is None and target_pixel_values is not None:
            target_embeds, target_tokens = self.get_target_embeds_and_reference_features(target_pixel_values)
        output = self.cir_output(query_embeds, target_embeds)
        reverse_query_embeds = reference_embeds = None
        if return_reverse_terms and self.config.bidirectional:
            if target_tokens is None:
                raise ValueError("Reversed queries need `target_pixel_values` (the target images' ViT tokens).")
            reverse_query_embeds = self.get_query_embeds(
                input_ids, attention_mask, reference_features=target_tokens, reverse=True
            )
            reference_embeds = self.project_image_tokens(reference_features)
        return BLIP4CIROutput(
            logits=output.logits,
            query_embeds=output.query_embeds,
            target_embeds=output.target_embeds,
            temperature=self.get_temperature(),
            reverse_query_embeds=reverse_query_embeds,
            reference_embeds=reference_embeds,
        )

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_blip(
        cls, name_or_path: str, temperature: float = 0.03, bidirectional: bool = False, **kwargs
    ) -> "BLIP4CIRModel":
        """
        Build a BLIP4CIR model from a transformers BLIP retrieval checkpoint (`BlipForImageTextRetrieval`
        layout, e.g. `Salesforce/blip-itm-base-coco`, or a local `save_pretrained` directory), for stage 1 from
        scratch. Copies the ViT, the text encoder (incl. its cross-attention) and both projections; the ITM
        head and the retrieval `temp` are not used. `kwargs` go to [`BLIP4CIRConfig`].
        """
        from transformers import BlipForImageTextRetrieval

        blip = BlipForImageTextRetrieval.from_pretrained(name_or_path)
        text_config = blip.config.text_config.to_dict()
        vision_config = blip.config.vision_config.to_dict()
        text_config["encoder_hidden_size"] = vision_config["hidden_size"]
        config = BLIP4CIRConfig(
            text_config=text_config,
            vision_config=vision_config,
            embed_dim=blip.config.image_text_hidden_size,
            temperature=temperature,
            bidirectional=bidirectional,
            **kwargs,
        )
        state = {k: v for k, v in blip.state_dict().items() if not k.startswith("itm_head.")}
        return load_base_weights(cls(config), state, name_or_path, is_new=lambda key: key in ("tau", "reversal_token"))


__all__ = ["BLIP4CIRModel", "BLIP4CIROutput", "BLIP4CIRPreTrainedModel"]
