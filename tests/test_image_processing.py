"""CLIP4Cir preprocessing (TargetPad / SquarePad / plain CLIP) and the processor round trip."""

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

import modeling_spn4cir  # noqa: F401
from modeling_spn4cir import CLIP4CIRConfig, CLIP4CIRImageProcessor, CLIP4CIRProcessor
from modeling_spn4cir.cir_contract import CLIP_MEAN, CLIP_STD, square_pad, target_pad


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((300, 100), (300, 240)),  # wide, ratio 3: max/1.25 = 240 -> vertical pad int(70) each side
        ((100, 300), (240, 300)),  # tall
        ((200, 200), (200, 200)),  # square: ratio 1 < 1.25, untouched
        ((120, 100), (120, 100)),  # ratio 1.2 < 1.25, untouched
        ((250, 100), (250, 200)),  # ratio 2.5: 250/1.25 = 200 -> pad 50 top and bottom
        ((101, 37), (101, 79)),  # 101/1.25 = 80.8 -> int((80.8-37)/2) = 21 each side -> 79
    ],
)
def test_target_pad_sizes(size, expected):
    assert target_pad(_image(*size), 1.25).size == expected


def test_target_pad_pads_with_black_and_centers():
    img = Image.new("RGB", (300, 100), (255, 255, 255))
    padded = np.asarray(target_pad(img, 1.25))
    assert padded[:70].max() == 0 and padded[-70:].max() == 0 and padded[70:170].min() == 255


def test_square_pad_sizes():
    assert square_pad(_image(300, 100)).size == (300, 300)
    assert square_pad(_image(102, 49)).size == (102, 101)  # int(53 / 2) = 26 on each side: not square


def test_pipeline_matches_hand_computation():
    img = _image(90, 60, seed=3)  # ratio 1.5 >= 1.25 -> TargetPad to 90x72 (pad int(6.0)=6 top and bottom)
    processor = CLIP4CIRImageProcessor(preprocessing="targetpad", size=32)
    padded = Image.new("RGB", (90, 72))
    padded.paste(img, (0, 6))
    resized = padded.resize((40, 32), Image.BICUBIC)  # short side 72 -> 32, long int(32 * 90 / 72) = 40
    cropped = resized.crop((4, 0, 36, 32))  # round((40 - 32) / 2) = 4
    expected = (np.asarray(cropped, dtype=np.float32) / 255 - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(
        CLIP_STD, dtype=np.float32
    )
    got = processor(img)["pixel_values"]
    assert got.shape == (1, 3, 32, 32) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_modes_differ_and_grayscale_becomes_rgb():
    img = _image(150, 50, mode="L")
    outs = {m: CLIP4CIRImageProcessor(preprocessing=m, size=16)([img, img])["pixel_values"] for m in
            ("targetpad", "squarepad", "resize")}
    assert all(o.shape == (2, 3, 16, 16) for o in outs.values())
    assert not torch.equal(outs["targetpad"], outs["squarepad"]) and not torch.equal(outs["targetpad"], outs["resize"])
    with pytest.raises(ValueError, match="preprocessing"):
        CLIP4CIRImageProcessor(preprocessing="crop")


def test_processor_roundtrip(tmp_path):
    image_processor = CLIP4CIRImageProcessor(size=32, target_ratio=1.5)
    processor = CLIP4CIRProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer())
    processor.save_pretrained(tmp_path)
    CLIP4CIRConfig(text_config={"vocab_size": 10}, vision_config={"projection_dim": 512}).save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CLIP4CIRProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), CLIP4CIRImageProcessor)
    assert loaded.image_processor.size == 32 and loaded.image_processor.target_ratio == 1.5
    images, texts = [_image(70, 40), _image(40, 90)], ["make it blue", "a red circle instead"]
    a, b = processor(images=images, text=texts), loaded(images=images, text=texts)
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].shape[0] == 2 and a["attention_mask"][0].sum() < a["attention_mask"].shape[1]
