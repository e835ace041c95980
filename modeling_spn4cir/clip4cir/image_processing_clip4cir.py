"""CLIP4Cir's image preprocessing as a Hugging Face image processor, on PIL and NumPy only.

Pipeline (the order of CLIP4Cir's `targetpad_transform` / `squarepad_transform` / CLIP's `_transform`):
pad (`targetpad`: only images whose long/short ratio is at least `target_ratio`, up to that ratio;
`squarepad`: to a square; `resize`: none) -> bicubic resize of the short side to `size` -> center crop
`size` x `size` -> RGB -> [0, 1] -> normalize with CLIP's mean/std.
"""

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

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
    Image processor of CLIP4Cir / SPN4CIR.

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


__all__ = ["CLIP4CIRImageProcessor", "target_pad", "square_pad"]
