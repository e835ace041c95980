"""Configuration of the CLIP4CIR model family (CLIP dual encoder + sum or Combiner fusion).

Self-contained on purpose (relative imports only): `save_pretrained` copies this file next to the
weights so that `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without the package.
"""

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig

FUSIONS = ("sum", "combiner")


@strict
class CLIP4CIRResNetConfig(PreTrainedConfig):
    r"""
    Geometry of OpenAI CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, ... or any other).

    layers (`list[int]`, defaults to `(3, 4, 6, 3)`):
        Bottleneck blocks in each of the four stages.
    width (`int`, defaults to 64):
        Channels of the stem output; stage `i` has `width * 2**i` planes and `width * 2**i * 4` output channels.
    image_size (`int`, defaults to 224):
        Input resolution; the attention pool sees an `image_size // 32` square grid.
    num_attention_heads (`int`, *optional*):
        Heads of the attention pool; `None` means OpenAI's rule `width * 32 // 64`.
    projection_dim (`int`, defaults to 1024):
        Output dimension of the attention pool (CLIP's joint embedding dimension).
    """

    model_type = "clip4cir_resnet"
    base_config_key = "vision_config"

    layers: list[int] | tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    image_size: int = 224
    num_attention_heads: int | None = None
    projection_dim: int = 1024
    num_channels: int = 3
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.layers = [int(n) for n in self.layers]
        if self.num_attention_heads is None:
            self.num_attention_heads = self.width * 32 // 64
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if len(self.layers) != 4:
            raise ValueError(f"`layers` must list the blocks of 4 stages, got {self.layers}.")
        if self.image_size % 32 != 0:
            raise ValueError(f"`image_size` must be a multiple of 32 for the ModifiedResNet, got {self.image_size}.")
        if (self.width * 32) % self.num_attention_heads != 0:
            raise ValueError(
                f"The attention pool width ({self.width * 32}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})."
            )

    @property
    def hidden_size(self) -> int:
        """Channels entering the attention pool, `[N, width * 32, image_size // 32, image_size // 32]`."""
        return self.width * 32


@strict
class CLIP4CIRConfig(PreTrainedConfig):
    r"""
    Configuration of [`CLIP4CIRModel`].

    text_config (`dict` or `CLIPTextConfig`, *optional*):
        The CLIP text transformer. Set `eos_token_id=2` to pool at the highest token id of each row
        (OpenAI CLIP's `argmax` rule, what the original checkpoints were trained with).
    vision_config (`dict`, `CLIPVisionConfig` or `CLIP4CIRResNetConfig`, *optional*):
        The image tower; a dict picks its class by `model_type` (`"clip_vision_model"` for a ViT,
        `"clip4cir_resnet"` for the ModifiedResNet). Defaults to a ViT.
    projection_dim (`int`, defaults to 512):
        Dimension D of the joint embedding space (text and image projections).
    fusion (`str`, defaults to `"sum"`):
        `"sum"`: query = normalize(reference image features + text features) (SPN4CIR's CLIP4CIR).
        `"combiner"`: CLIP4Cir's Combiner network.
    combiner_projection_dim, combiner_hidden_dim (`int`, *optional*):
        Combiner sizes; `None` means CLIP4Cir's defaults, `4 * projection_dim` and `8 * projection_dim`.
    combiner_dropout (`float`, defaults to 0.5):
        Dropout inside the Combiner (active in training only).
    temperature (`float`, defaults to 0.02):
        InfoNCE temperature tau; logits = query . target / tau.
    clip_train_mode (`bool`, defaults to `False`):
        Whether `model.train()` also puts the CLIP towers (text and image, with their projections) in training
        mode. `False` is the original: CLIP4Cir fine-tunes with `clip_model.eval()` and SPN4CIR never calls
        `.train()` on its CLIP, so the ModifiedResNet's BatchNorm keeps its running statistics (a training step
        neither updates nor uses batch statistics) and the towers' dropout (0 in every CLIP) stays off. The
        Combiner still follows `train()` (CLIP4Cir trains it with dropout).
    """

    model_type = "clip4cir"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | CLIP4CIRResNetConfig | None = None
    projection_dim: int = 512
    fusion: str = "sum"
    combiner_projection_dim: int | None = None
    combiner_hidden_dim: int | None = None
    combiner_dropout: float = 0.5
    temperature: float = 0.02
    clip_train_mode: bool = False
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # The image tower's class depends on the checkpoint, so a dict is resolved by its model_type
        # here instead of by the fixed sub-config spec.
        if isinstance(self.vision_config, dict):
            vision = dict(self.vision_config)
            if vision.pop("model_type", None) == CLIP4CIRResNetConfig.model_type:
                self.vision_config = CLIP4CIRResNetConfig(**vision)
            else:
                self.vision_config = CLIPVisionConfig(**vision)
        if self.combiner_projection_dim is None:
            self.combiner_projection_dim = 4 * self.projection_dim
        if self.combiner_hidden_dim is None:
            self.combiner_hidden_dim = 8 * self.projection_dim
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"`fusion` must be one of {FUSIONS}, got {self.fusion!r}.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.text_config.projection_dim != self.projection_dim:
            raise ValueError(
                f"text_config.projection_dim ({self.text_config.projection_dim}) must equal "
                f"projection_dim ({self.projection_dim})."
            )
        if self.vision_config.projection_dim != self.projection_dim:
            raise ValueError(
                f"vision_config.projection_dim ({self.vision_config.projection_dim}) must equal "
                f"projection_dim ({self.projection_dim})."
            )

    @property
    def vision_tower(self) -> str:
        """`"resnet"` for the ModifiedResNet, `"vit"` for a CLIP ViT."""
        return "resnet" if isinstance(self.vision_config, CLIP4CIRResNetConfig) else "vit"

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size


__all__ = ["CLIP4CIRConfig", "CLIP4CIRResNetConfig"]
