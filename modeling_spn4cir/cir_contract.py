"""The CIR model contract that every family implements, and what the families share to implement it.

A family's model mixes [`CIRModelMixin`] into its `PreTrainedModel` and implements:

| method | returns |
|---|---|
| `get_reference_features(pixel_values)` | what the query side consumes, any shape `[N, ...]`: a vector `[N, D]` (CLIP4CIR), tokens `[N, T, H]` (TG-CIR, BLIP4CIR), ... |
| `target_embeds_from_reference_features(reference_features)` | the target embeddings of the same images: `[N, D]` or `[N, Q, D]` (multi-vector targets, e.g. SPRC's Q-Former tokens), L2-normalized |
| `get_query_embeds(input_ids, attention_mask, reference_features=None, pixel_values=None)` | `[B, D]`, L2-normalized |
| `query_side_modules()` | `{name: module}` that SPN's stage 2 trains (the original's stage-2 optimizer, restricted to what gets gradient) |
and, where the family needs it: `forward` (default: `get_query_embeds`, `get_target_embeds`, `cir_output`; a
family with more outputs, e.g. its stage-1 terms, extends it), `similarity` (default: dot product, or the max over target tokens for `[N, Q, D]`
targets), `get_temperature` (default `config.temperature`), `untie_query_side` (stage 1 shares modules between the
query and the target side), `has_own_query_side` (no while the modules stage 2 trains do not exist yet),
`get_text_query_embeds` (the fusion can compose a query without an image), `eval_mode_modules` (submodules
`train()` keeps in eval mode), `combine(reference_features, text_features)` with
`forward(..., return_fusion_features=True)` (the fusion composes any reference feature vector with any text feature
vector: the `text` / `reference` negative types of `trainers.losses.NegativeTypeLoss`).

The mixin derives the rest: `get_target_embeds(pixel_values)` and `get_target_embeds_and_reference_features` (one
image pass for both roles), `query_side_parameters()`, `target_side_state_dict()`, `freeze_target_side()` /
`unfreeze_target_side()`, `get_image_query_embeds`, `cir_output` and `reference_features_for` (the reference prelude
of `get_query_embeds`). [`is_cir_model`] tells a CIR model by its methods, whichever copy of this file it comes from.

Also here, for every family: [`CIRProcessorMixin`] (the processor call), [`CLIP4CIRImageProcessor`] (CLIP4Cir's
image preprocessing, used by all four families), [`clip_tower_configs`] and [`load_base_weights`] (building a
family on a base checkpoint).

This file is shipped with checkpoints: each family folder holds a copy (`<family>/cir_contract.py`, written by
`python utils/check_copies.py --fix` and checked by the tests), so that `save_pretrained` puts it beside the family's
code for `trust_remote_code` loading without the package. It imports only torch, transformers, numpy and PIL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import ModelOutput


@dataclass
class CIRModelOutput(ModelOutput):
    """
    Output of a CIR model's `forward`.

    Args:
        logits (`torch.FloatTensor` of shape `[B, N_t]`, *optional*):
            `similarity(query_embeds, target_embeds) / temperature`; only when targets are given.
        query_embeds (`torch.FloatTensor` of shape `[B, D]`):
            L2-normalized composed queries.
        target_embeds (`torch.FloatTensor` of shape `[N_t, D]` or `[N_t, Q, D]`, *optional*):
            L2-normalized target embeddings.
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Never computed by the model: `CIRTrainer` computes SPN's losses with loss modules (gathered across
            processes, duplicates masked). Kept so that the output fits `transformers.Trainer`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    query_embeds: torch.FloatTensor | None = None
    target_embeds: torch.FloatTensor | None = None


def dot_similarity(query_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """`[B, D] x [N, D] -> [B, N]` dot products (cosine for normalized inputs), in the query's dtype."""
    return query_embeds @ target_embeds.to(query_embeds.dtype).T


def max_token_similarity(query_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """`[B, D] x [N, Q, D] -> [B, N]`: `score[b, n] = max_q query[b] . target[n, q]` (SPRC, BLIP-2)."""
    target = target_embeds.to(query_embeds.dtype)
    return torch.einsum("bd,nqd->bnq", query_embeds, target).amax(dim=-1)


# What training, the bank, evaluation and retrieval call on a model: a CIR model has all of them.
CIR_MODEL_METHODS = ("get_reference_features", "target_embeds_from_reference_features", "get_query_embeds",
                     "get_target_embeds", "similarity", "query_side_modules", "untie_query_side",
                     "freeze_target_side")


def is_cir_model(obj) -> bool:
    """Whether `obj` implements the CIR model contract. Checks the methods, not a class: every family folder and
    every `trust_remote_code` checkpoint holds its own copy of [`CIRModelMixin`]."""
    return all(callable(getattr(obj, name, None)) for name in CIR_MODEL_METHODS)


class CIRModelMixin:
    """Shared half of the CIR model contract; see the module docstring for what a family must provide."""

    _target_side_frozen = False
    _requires_grad_before_freeze: dict[str, bool] = {}

    # --------------------------------------------------------------------------------- to override
    def query_side_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must say which modules its stage 2 trains.")

    def target_embeds_from_reference_features(self, reference_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must map reference features to target embeddings.")

    def similarity(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
        """`query_embeds` `[B, D]`, `target_embeds` `[N, D]` (or `[N, Q, D]` where a family scores tokens) ->
        scores `[B, N]`. Dot product of normalized embeddings by default."""
        if target_embeds.ndim == 3:
            return max_token_similarity(query_embeds, target_embeds)
        return dot_similarity(query_embeds, target_embeds)

    def get_temperature(self) -> float | torch.Tensor:
        """InfoNCE temperature: `config.temperature`, or a learnable tensor where the family trains it."""
        return self.config.temperature

    def untie_query_side(self) -> None:
        """SPN's stage-2 preparation: give the query side its own copies of the modules it shares with the target
        side in stage 1, and record it in the config (`config.tie_query_side = False`). Families whose query side
        shares nothing (the default) have nothing to do; idempotent."""

    def has_own_query_side(self) -> bool:
        """Whether the modules SPN's stage 2 trains (`query_side_modules()`) exist yet. Yes by default; a family whose
        stage-1 model shares them with the target side until `untie_query_side()` copies them off (SPRC's Q-Former)
        says no until then: every weight of such a model determines its target embeddings."""
        return True

    def get_text_query_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """A query from a modification text alone (`input_ids` `[B, L]`) -> `[B, D]`, where the family's fusion can
        compose one without a reference image; here it cannot."""
        raise ValueError(
            f"{type(self).__name__} (fusion {getattr(self.config, 'fusion', None)!r}) cannot compose a query without "
            "a reference image: its fusion reads the reference image's features. Text-only queries need a model "
            "whose fusion adds the text to the image (CLIP4CIR with fusion='sum'). Pass a reference image."
        )

    def eval_mode_modules(self) -> list[nn.Module]:
        """The submodules `train()` keeps in eval mode: after `freeze_target_side()`, every child that holds no
        query-side parameter (so that BatchNorm statistics and dropout of the frozen towers cannot change the
        bank's inputs either). Families add their own rules."""
        if not self._target_side_frozen:
            return []
        query_side = {id(p) for p in self.query_side_parameters()}
        query_modules = {id(m) for m in self.query_side_modules().values() if isinstance(m, nn.Module)}
        return [child for _, child in self.named_children()
                if id(child) not in query_modules and not any(id(p) in query_side for p in child.parameters())]

    # ---------------------------------------------------------------------------------- derived
    def get_target_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """`pixel_values` `[N, 3, S, S]` -> L2-normalized target embeddings `[N, D]` or `[N, Q, D]`."""
        return self.target_embeds_from_reference_features(self.get_reference_features(pixel_values))

    def get_target_embeds_and_reference_features(self, pixel_values: torch.FloatTensor):
        """Both image-side outputs of `pixel_values` `[N, 3, S, S]` from one image pass: (target embeddings,
        reference features) — what the candidate bank and the evaluator store."""
        reference_features = self.get_reference_features(pixel_values)
        return self.target_embeds_from_reference_features(reference_features), reference_features

    def get_image_query_embeds(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """A query from a reference image alone (`pixel_values` `[B, 3, S, S]`): its own target embedding `[B, D]`
        (single-vector families only)."""
        targets = self.get_target_embeds(pixel_values)
        if targets.ndim != 2:
            raise ValueError(f"{type(self).__name__} has multi-vector targets; image-only queries need a "
                             "single-vector family. Add a modification text.")
        return targets

    def reference_features_for(self, input_ids: torch.LongTensor, reference_features: torch.Tensor | None = None,
                               pixel_values: torch.FloatTensor | None = None,
                               caller: str = "get_query_embeds") -> torch.Tensor:
        """The reference features `[B, ...]` of the `B` texts `input_ids`: `reference_features` as given (e.g. a
        bank's rows), else computed from the reference images `pixel_values` `[B, 3, S, S]`."""
        if reference_features is None:
            if pixel_values is None:
                raise ValueError(f"{caller} needs `reference_features` or reference `pixel_values`.")
            reference_features = self.get_reference_features(pixel_values)
        if reference_features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{reference_features.shape[0]} reference features for {input_ids.shape[0]} texts; "
                             "pass one reference per modification text.")
        return reference_features

    def query_side_parameters(self) -> list[nn.Parameter]:
        """Parameters stage 2 trains (never the target side), each once."""
        seen, out = set(), []
        for module in self.query_side_modules().values():
            for parameter in (module.parameters() if isinstance(module, nn.Module) else [module]):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    out.append(parameter)
        return out

    def target_side_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers outside `query_side_parameters()`: what produces target embeddings and reference
        features, so what a candidate bank's or a gallery index's fingerprint must cover. Before the query side has
        modules of its own (`has_own_query_side()` is False), the whole state: untying then adds the query side's
        copies and leaves these keys, so a stage-2 model keeps its stage-1 model's fingerprint (bank, index)."""
        if not self.has_own_query_side():
            return dict(self.state_dict())
        query_side = {id(p) for p in self.query_side_parameters()}
        names = {name for name, p in self.named_parameters() if id(p) in query_side}
        return {k: v for k, v in self.state_dict().items() if k not in names}

    @property
    def target_side_frozen(self) -> bool:
        return self._target_side_frozen

    def freeze_target_side(self) -> None:
        """Stage 2: stop gradients into everything but `query_side_parameters()`, and from now on keep the target
        side in eval mode (`eval_mode_modules`). Changes no module: `untie_query_side()` is the step that does."""
        query_side = {id(p) for p in self.query_side_parameters()}
        if not self._target_side_frozen:
            self._requires_grad_before_freeze = {name: p.requires_grad for name, p in self.named_parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in query_side)
        self._target_side_frozen = True
        self.train(self.training)

    def unfreeze_target_side(self) -> None:
        """Undo `freeze_target_side()`: each parameter trains as before it (a parameter added since then trains),
        and `train()` follows its mode on the target side again."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(self._requires_grad_before_freeze.get(name, True))
        self._target_side_frozen = False
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.eval_mode_modules():
                module.eval()
        return self

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.FloatTensor | None = None, reference_features: torch.Tensor | None = None,
                target_pixel_values: torch.FloatTensor | None = None,
                target_embeds: torch.Tensor | None = None) -> CIRModelOutput:
        """The forward of a family that needs nothing more: `input_ids`, `attention_mask` `[B, L]` modification
        texts; `pixel_values` `[B, 3, S, S]` reference images (or `reference_features`); `target_pixel_values`
        `[B_t, 3, S, S]` (or `target_embeds` `[B_t, D]` / `[B_t, Q, D]`) -> [`CIRModelOutput`] (`query_embeds`
        `[B, D]`; with targets, `target_embeds` and `logits` `[B, B_t]`). Anything else is a `TypeError`."""
        query_embeds = self.get_query_embeds(input_ids, attention_mask, reference_features, pixel_values)
        if target_embeds is None and target_pixel_values is not None:
            target_embeds = self.get_target_embeds(target_pixel_values)
        return self.cir_output(query_embeds, target_embeds)

    def cir_output(self, query_embeds: torch.Tensor, target_embeds: torch.Tensor | None) -> CIRModelOutput:
        """The `forward` result: embeddings, and `similarity / temperature` logits when targets are given."""
        logits = None
        if target_embeds is not None:
            logits = self.similarity(query_embeds, target_embeds) / self.get_temperature()
        return CIRModelOutput(logits=logits, query_embeds=query_embeds, target_embeds=target_embeds)


# ------------------------------------------------------------------------------ building on a base checkpoint
def clip_tower_configs(clip) -> dict:
    """The tower configs of a `transformers.CLIPModel`, both projecting to its `projection_dim`:
    `{"text_config", "vision_config", "projection_dim"}` (keyword arguments of the CLIP-based family configs)."""
    projection_dim = clip.config.projection_dim
    text_config = clip.config.text_config.to_dict()
    vision_config = clip.config.vision_config.to_dict()
    text_config["projection_dim"] = vision_config["projection_dim"] = projection_dim
    return {"text_config": text_config, "vision_config": vision_config, "projection_dim": projection_dim}


def load_base_weights(model: nn.Module, state: dict, source: str, is_new: Callable[[str], bool]):
    """Load a base checkpoint's `state` (from `source`) into `model`: every key must land, every model weight must
    come from it except those `is_new(name)` says the family adds (they keep their initialization). Returns `model`,
    named after `source`."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_new(k)]
    if missing or unexpected:
        raise ValueError(f"Base checkpoint {source!r} does not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    model.name_or_path = str(source)
    return model


# ------------------------------------------------------------------------------------------- processors
class CIRProcessorMixin:
    """The call every family's processor shares: `processor(images=..., text=...)` -> `pixel_values` `[N, 3, S, S]`
    and/or `input_ids`, `attention_mask` `[B, L]`. A family sets `text_defaults` (tokenizer keyword defaults:
    its padding, truncation) and overrides `encode_text` for its own text handling (SPRC's caption cleaning,
    BLIP4CIR's `[ENC]`)."""

    text_defaults: dict = {"padding": True, "truncation": True}

    def encode_text(self, text, return_tensors, **kwargs):
        return self.tokenizer(text, return_tensors=return_tensors, **{**self.text_defaults, **kwargs})

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs):
        if images is None and text is None:
            raise ValueError("Pass `images`, `text` or both.")
        data = {}
        if text is not None:
            data.update(self.encode_text(text, return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)


# CLIP4Cir's image preprocessing, on PIL and NumPy only. Pipeline (the order of CLIP4Cir's `targetpad_transform` /
# `squarepad_transform` / CLIP's `_transform`): pad (`targetpad`: only images whose long/short ratio is at least
# `target_ratio`, up to that ratio; `squarepad`: to a square; `resize`: none) -> bicubic resize of the short side to
# `size` -> center crop `size` x `size` -> RGB -> [0, 1] -> normalize with the mean/std (CLIP's by default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING_MODES = ("targetpad", "squarepad", "resize")


def target_pad(image: Image.Image, target_ratio: float) -> Image.Image:
    """CLIP4Cir's TargetPad: black-pad an image whose aspect ratio `max(w, h) / min(w, h)` is at least
    `target_ratio` so that its ratio becomes `target_ratio` (padding split evenly, truncated to ints)."""
    w, h = image.size
    if max(w, h) / min(w, h) < target_ratio:
        return image
    scaled_max_wh = max(w, h) / target_ratio
    hp = max(int((scaled_max_wh - w) / 2), 0)
    vp = max(int((scaled_max_wh - h) / 2), 0)
    return _pad(image, hp, vp, hp, vp)


def square_pad(image: Image.Image) -> Image.Image:
    """CLIP4Cir's SquarePad: black-pad the short side up to the long side (evenly, truncated to ints)."""
    w, h = image.size
    max_wh = max(w, h)
    horizontal, vertical = int((max_wh - w) / 2), int((max_wh - h) / 2)
    return _pad(image, horizontal, vertical, horizontal, vertical)


def _pad(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """Pad with value 0 on each side by the given number of pixels (palette kept)."""
    if left == top == right == bottom == 0:
        return image
    padded = Image.new(image.mode, (image.width + left + right, image.height + top + bottom), 0)
    if image.mode == "P":
        padded.putpalette(image.getpalette())
    padded.paste(image, (left, top))
    return padded


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the short side is `size` (torchvision `Resize(int)` arithmetic: the long
    side is `int(size * long / short)`)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central `size` x `size` region (torchvision rounding: offset `round((dim - size) / 2)`);
    a smaller image is zero-padded first, as torchvision does."""
    w, h = image.size
    if w < size or h < size:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        image = _pad(image, pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)
        w, h = image.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class CLIP4CIRImageProcessor(BaseImageProcessor):
    r"""
    CLIP4Cir's image preprocessing (TargetPad / SquarePad / CLIP's resize), the image processor of every family.
    The class keeps its name from when it lived in `clip4cir/`: saved `preprocessor_config.json` files name it.

    Args:
        preprocessing (`str`, defaults to `"targetpad"`): `"targetpad"`, `"squarepad"` or `"resize"` (plain CLIP).
        target_ratio (`float`, defaults to 1.25): TargetPad's aspect-ratio threshold and target.
        size (`int`, defaults to 224): output side S (the model's input resolution; 288 for RN50x4).
        image_mean, image_std (`tuple[float]`): per-channel normalization (CLIP's by default).

    `__call__(images)` returns a `BatchFeature` with `pixel_values` of shape `[N, 3, S, S]`.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        preprocessing: str = "targetpad",
        target_ratio: float = 1.25,
        size: int = 224,
        image_mean: tuple[float, ...] | list[float] = CLIP_MEAN,
        image_std: tuple[float, ...] | list[float] = CLIP_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"`preprocessing` must be one of {PREPROCESSING_MODES}, got {preprocessing!r}.")
        if isinstance(size, dict):  # tolerate the {"height": S, "width": S} form of other CLIP processors
            size = size.get("shortest_edge", size.get("height"))
        self.preprocessing = preprocessing
        self.target_ratio = float(target_ratio)
        self.size = int(size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def transform(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> normalized `float32` array `[3, S, S]`."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if self.preprocessing == "targetpad":
            image = target_pad(image, self.target_ratio)
        elif self.preprocessing == "squarepad":
            image = square_pad(image)
        image = center_crop(resize_short_side(image, self.size), self.size)
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return array.transpose(2, 0, 1)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """`images`: a PIL image / array or a list of them -> `BatchFeature(pixel_values=[N, 3, S, S])`."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        pixel_values = np.stack([self.transform(image) for image in images]) if len(images) else np.zeros(
            (0, 3, self.size, self.size), dtype=np.float32
        )
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["CIR_MODEL_METHODS", "CIRModelMixin", "CIRModelOutput", "CIRProcessorMixin", "CLIP4CIRImageProcessor",
           "clip_tower_configs", "dot_similarity", "is_cir_model", "load_base_weights", "max_token_similarity",
           "square_pad", "target_pad"]
