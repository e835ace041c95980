"""Configuration of the SPRC model family (BLIP-2 Q-Former for composed image retrieval, as in SPN4CIR's `blip24cir/`).

Self-contained on purpose (relative imports only): `save_pretrained` copies this file next to the weights so that
`AutoModel.from_pretrained(dir, trust_remote_code=True)` works without the package.
"""

from huggingface_hub.dataclasses import strict
from transformers import Blip2QFormerConfig, Blip2VisionConfig, PreTrainedConfig


@strict
class SPRCConfig(PreTrainedConfig):
    r"""
    Configuration of [`SPRCModel`] (SPRC, Bai et al., ICLR 2024, as trained by SPN4CIR).

    vision_config (`dict` or `Blip2VisionConfig`, *optional*):
        The EVA ViT (`transformers.Blip2VisionModel`); BLIP-2's ViT-g by default. Its `layer_norm_eps` is the blocks'
        LayerNorm epsilon; the final LayerNorm (LAVIS `ln_vision`) uses `ln_vision_eps`.
    qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
        The Q-Former (`transformers.Blip2QFormerModel`); `use_qformer_text_input` is forced on (the text FFNs exist)
        and `encoder_hidden_size` follows the ViT width.
    num_query_tokens (`int`, defaults to 32):
        Learned query tokens; the first text position (the `[CLS]` output read by the query side) is this index.
    embed_dim (`int`, defaults to 256):
        Dimension D of the joint space (`vision_projection`, `text_projection`).
    ln_vision_eps (`float`, defaults to 1e-5):
        Epsilon of LAVIS' `ln_vision` (`torch.nn.LayerNorm` default), which differs from the ViT blocks' 1e-6.
    tie_query_side (`bool`, defaults to `True`):
        `True`: one Q-Former does everything (SPRC stage 1, the original's `query_type = 0`). `False`: the
        second (caption-side) pass runs through a separate copy `qformer_query` (+ its `text_projection`), the
        modules SPN's stage 2 trains ([`SPRCModel.untie_query_side`], the original's `init_stage2`,
        `query_type = 1`). (Configs saved before this field existed say `separate_query_qformer`, its negation.)
    temperature (`float`, defaults to 0.05):
        SPN's stage-2 tau (`--tau`, stored by the original as `temp` after `init_stage2`).
    stage1_temperature (`float`, defaults to 0.07):
        Initial value of SPRC's learnable stage-1 temperature (the parameter `temp`).
    stage1_loss (`str`, defaults to `"sprc"`):
        The stage-1 objective the trainer selects for this family (`losses_sprc.SPRCStage1Loss`).
    freeze_vision_encoder (`bool`, defaults to `True`):
        SPRC trains with a frozen ViT (`freeze_vit=True`; `ln_vision` stays trainable): the ViT's parameters are
        created with `requires_grad=False`.
    """

    model_type = "sprc"
    sub_configs_defaults = {"vision_config": Blip2VisionConfig, "qformer_config": Blip2QFormerConfig}

    vision_config: dict | Blip2VisionConfig | None = None
    qformer_config: dict | Blip2QFormerConfig | None = None
    num_query_tokens: int = 32
    embed_dim: int = 256
    ln_vision_eps: float = 1e-5
    tie_query_side: bool = True
    temperature: float = 0.05
    stage1_temperature: float = 0.07
    stage1_loss: str = "sprc"
    freeze_vision_encoder: bool = True
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if "separate_query_qformer" in kwargs:  # the negated field of configs saved before `tie_query_side`
            self.tie_query_side = not kwargs.pop("separate_query_qformer")
        if isinstance(self.vision_config, dict):
            vision = {k: v for k, v in self.vision_config.items() if k != "model_type"}
            self.vision_config = Blip2VisionConfig(**vision)
        elif self.vision_config is None:
            self.vision_config = Blip2VisionConfig()
        if isinstance(self.qformer_config, dict):
            qformer = {k: v for k, v in self.qformer_config.items() if k != "model_type"}
            self.qformer_config = Blip2QFormerConfig(**qformer)
        elif self.qformer_config is None:
            self.qformer_config = Blip2QFormerConfig()
        # The text pass needs the Q-Former's text FFNs, and its cross-attention reads the ViT tokens.
        self.qformer_config.use_qformer_text_input = True
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.temperature <= 0 or self.stage1_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {self.temperature}, {self.stage1_temperature}.")
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be positive, got {self.num_query_tokens}.")

    @property
    def image_size(self) -> int:
        size = self.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)


__all__ = ["SPRCConfig"]
