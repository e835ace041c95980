"""Configuration of the BLIP4CIR model family (BLIP ViT + BLIP's image-grounded BERT text encoder).

Self-contained on purpose (relative imports only): `save_pretrained` copies this file next to the
weights so that `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without the package.
"""

from huggingface_hub.dataclasses import strict
from transformers import BlipTextConfig, BlipVisionConfig, PreTrainedConfig

# BLIP's ViT (timm-style, vit.py) uses LayerNorm eps 1e-6; transformers' BlipVisionConfig defaults to 1e-5.
BLIP_VIT_LAYER_NORM_EPS = 1e-6


@strict
class BLIP4CIRConfig(PreTrainedConfig):
    r"""
    Configuration of [`BLIP4CIRModel`] (SPN4CIR's BLIP4CIR, after Liu et al.'s "Candidate Set Re-ranking" stage I).

    text_config (`dict` or `BlipTextConfig`, *optional*):
        BLIP's BERT text encoder. It is always built with cross-attention layers (`is_decoder=True` in
        transformers' terms, which only controls whether the layers exist) and always run bidirectionally;
        `encoder_hidden_size` must equal the vision width.
    vision_config (`dict` or `BlipVisionConfig`, *optional*):
        BLIP's ViT. Defaults to ViT-B/16 at 384 px with the original LayerNorm eps of 1e-6.
    embed_dim (`int`, defaults to 256):
        Dimension E of the joint space (`vision_proj` / `text_proj`, both with bias).
    temperature (`float`, defaults to 0.03):
        Initial value of the learnable InfoNCE temperature `tau` (SPN stage 2: 0.03 FashionIQ, 0.02 CIRR).
        The trained value lives in the model's `tau` parameter (`model.get_temperature()`).
    enc_token_id (`int`, *optional*):
        Id of BLIP's `[ENC]` token, which replaces `[CLS]` at position 0 of every query text. `None` means
        `text_config.vocab_size - 1` (BLIP's `init_tokenizer` appends `[DEC]` then `[ENC]` to BERT's vocabulary).
    bidirectional (`bool`, defaults to `False`):
        Bi-BLIP4CIR's "+Bi" stage-1 option (Liu et al., WACV 2024): adds a learnable reversal token that marks
        reversed queries (target image + modification text must retrieve the reference image). SPN4CIR's own
        code has no reverse path; off by default.
    stage2_dropout (`bool`, defaults to `False`):
        SPN4CIR trains stage 2 with the model in eval mode (`model.blip.eval()`, no dropout); `False` reproduces
        that: after `freeze_target_side()`, `model.train()` keeps every submodule in eval mode.
    stage1_loss (`str`, *optional*):
        Name of the stage-1 objective: `"in_batch_infonce"` (plain InfoNCE), or `"blip4cir_bidirectional"`
        (forward InfoNCE + 0.4 x reverse InfoNCE, `losses_blip4cir`) when `bidirectional` is set.
    """

    model_type = "blip4cir"
    sub_configs_defaults = {"text_config": BlipTextConfig, "vision_config": BlipVisionConfig}

    text_config: dict | BlipTextConfig | None = None
    vision_config: dict | BlipVisionConfig | None = None
    embed_dim: int = 256
    temperature: float = 0.03
    enc_token_id: int | None = None
    bidirectional: bool = False
    stage2_dropout: bool = False
    stage1_loss: str | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = {"layer_norm_eps": BLIP_VIT_LAYER_NORM_EPS}
        if self.text_config is None:
            vision_width = (
                self.vision_config.get("hidden_size", 768)
                if isinstance(self.vision_config, dict)
                else self.vision_config.hidden_size
            )
            self.text_config = {"num_attention_heads": 12, "encoder_hidden_size": vision_width}
        # Built here (not only by `sub_configs_defaults`) so that older transformers 5.x releases agree.
        if isinstance(self.vision_config, dict):
            self.vision_config = BlipVisionConfig(**{k: v for k, v in self.vision_config.items() if k != "model_type"})
        if isinstance(self.text_config, dict):
            self.text_config = BlipTextConfig(**{k: v for k, v in self.text_config.items() if k != "model_type"})
        super().__post_init__(**kwargs)
        # The layers need their cross-attention blocks; the model always runs them with is_decoder=False.
        self.text_config.is_decoder = True
        self.text_config.use_cache = False
        if self.enc_token_id is None:
            self.enc_token_id = self.text_config.vocab_size - 1
        if self.stage1_loss is None:
            self.stage1_loss = "blip4cir_bidirectional" if self.bidirectional else "in_batch_infonce"

    def validate_architecture(self):
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.text_config.encoder_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"text_config.encoder_hidden_size ({self.text_config.encoder_hidden_size}) must equal the vision "
                f"width vision_config.hidden_size ({self.vision_config.hidden_size}): the text encoder "
                "cross-attends to the ViT tokens."
            )
        if not 0 <= self.enc_token_id < self.text_config.vocab_size:
            raise ValueError(f"enc_token_id {self.enc_token_id} outside the vocabulary ({self.text_config.vocab_size}).")

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_image_tokens(self) -> int:
        """ViT tokens per image (CLS + patches): the `T` of reference features `[N, T, H]`."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2 + 1


__all__ = ["BLIP4CIRConfig"]
