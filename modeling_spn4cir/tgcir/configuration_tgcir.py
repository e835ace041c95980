"""Configuration of the TG-CIR model family (CLIP ViT towers + TG-CIR's token learners and remain-map fusion).

Self-contained on purpose (relative imports only): `save_pretrained` copies this file next to the
weights so that `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without the package.
"""

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig


@strict
class TGCIRConfig(PreTrainedConfig):
    r"""
    Configuration of [`TGCIRModel`] (TG-CIR, Wen et al., ACM MM 2023, as trained by SPN4CIR).

    text_config (`dict` or `CLIPTextConfig`, *optional*):
        The CLIP text transformer. `eos_token_id=2` pools at the highest token id of each row (OpenAI CLIP's
        `argmax` rule, what the original checkpoints use). The text tower always runs without an attention
        mask (causal mask only), as the original: padding positions are attended and enter the token learner.
    vision_config (`dict` or `CLIPVisionConfig`, *optional*):
        The CLIP ViT image tower.
    projection_dim (`int`, defaults to 512):
        Dimension D of the joint space: CLIP's projections, TG-CIR's `fc` / `text_fc` outputs and every token.
    num_global_tokens (`int`, defaults to 4):
        P: global tokens = the projected CLIP embedding times `relu(masks.weight[p])`.
    num_local_tokens (`int`, defaults to 8):
        Q: local tokens of the token learner (one sigmoid spatial attention each).
    tie_query_side (`bool`, defaults to `False`):
        `True`: the text side uses the image side's token learner and masks (the original TG-CIR, stage 1).
        `False`: the text side has its own copies (`tokenlearn_text`, `masks_text`; SPN4CIR's stage 2).
        [`TGCIRModel.untie_query_side`] unties them the way the original's stage 2 does. (Configs saved before
        this field existed say `share_token_learner`, read as the same value.)
    temperature (`float`, defaults to 0.02):
        SPN stage-2 InfoNCE temperature tau (0.02 FashionIQ, 0.01 CIRR in the paper configs).
    stage1_loss (`str`, defaults to `"tgcir"`):
        Name of the stage-1 objective (`losses_tgcir.TGCIRStage1Loss`: TG-CIR's six-term loss).
    stage1_logit_scale_init (`float`, defaults to 10.0):
        Initial value of the learnable stage-1 logit scale (the original's `loss_T`).
    """

    model_type = "tgcir"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    num_global_tokens: int = 4
    num_local_tokens: int = 8
    tie_query_side: bool = False
    temperature: float = 0.02
    stage1_loss: str = "tgcir"
    stage1_logit_scale_init: float = 10.0
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if "share_token_learner" in kwargs:  # the field's name in configs saved before `tie_query_side`
            self.tie_query_side = bool(kwargs.pop("share_token_learner"))
        if self.text_config is None:
            self.text_config = CLIPTextConfig(projection_dim=self.projection_dim)
        elif isinstance(self.text_config, dict):
            self.text_config = CLIPTextConfig(**{k: v for k, v in self.text_config.items() if k != "model_type"})
        if self.vision_config is None:
            self.vision_config = CLIPVisionConfig(projection_dim=self.projection_dim)
        elif isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig(
                **{k: v for k, v in self.vision_config.items() if k != "model_type"}
            )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.num_global_tokens < 1 or self.num_local_tokens < 1:
            raise ValueError(
                f"TG-CIR needs at least one global and one local token, got P={self.num_global_tokens}, "
                f"Q={self.num_local_tokens}."
            )
        for name in ("text_config", "vision_config"):
            sub = getattr(self, name)
            if sub.projection_dim != self.projection_dim:
                raise ValueError(
                    f"{name}.projection_dim ({sub.projection_dim}) must equal projection_dim ({self.projection_dim})."
                )

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def text_padding(self) -> str:
        """How texts must be padded: `"max_length"` (the context length, as the original `clip.tokenize`), since
        the text tower runs without a padding mask and the padding positions enter the text tokens."""
        return "max_length"

    @property
    def num_tokens(self) -> int:
        """P + Q: tokens per image / text (the reference features are `[N, P + Q, D]`)."""
        return self.num_global_tokens + self.num_local_tokens


__all__ = ["TGCIRConfig"]
