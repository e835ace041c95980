"""The embedded default's generative captioner stand-in: a tiny LLaVA trained from scratch, saved like a Hub
checkpoint and used through MLLMCaptioner (AutoProcessor, chat template, generate); and how its captions are scored
(phrase precision against the scene graph)."""

import json

import datasets
import pytest
from PIL import Image
from spn_recipe.generative_captioner import (
    CaptionerConfig,
    _prompt_ids,
    build_captioner,
    caption_phrases,
    caption_precision,
    load_captioner,
    train_generative_captioner,
)

COLOURS = {"red": (220, 40, 40), "blue": (50, 80, 230), "green": (40, 180, 60)}
CAPTIONS = {"red": "a large red square", "blue": "a small blue circle, a large blue cross",
            "green": "a small green diamond and a large green triangle"}


def _corpus(n_per_colour: int):
    rows = []
    for k in range(n_per_colour):
        for colour, rgb in COLOURS.items():
            rows.append({"image_id": f"{colour}-{k}", "image": Image.new("RGB", (64, 64), rgb),
                         "caption": CAPTIONS[colour], "scene": "[]"})
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


TINY = dict(hidden=32, heads=2, vision_layers=1, text_layers=2, patch=16, batch_size=12, learning_rate=3e-3)


def test_training_prompt_is_the_one_mllm_captioner_sends(tmp_path):
    """Training conditions on exactly the tokens the MLLM captioner code path feeds the model before its answer."""
    cfg = CaptionerConfig(**TINY)
    model, processor = build_captioner(list(CAPTIONS.values()), cfg)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    captioner = load_captioner(tmp_path)
    image = Image.new("RGB", (64, 64), COLOURS["red"])
    sent = []
    generate = captioner.model.generate
    captioner.model.generate = lambda **inputs: sent.append(inputs["input_ids"][0].tolist()) or generate(**inputs)
    captioner({"image": [image]})
    assert sent == [_prompt_ids(processor, image)]
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert sent[0].count(image_token) == (64 // 16) ** 2  # the image's patches, expanded by the processor
    assert "please briefly describe the image in 10 words" in processor.tokenizer.decode(sent[0])


@pytest.mark.slow
def test_captioner_learns_its_training_captions_and_is_scored_on_held_out_images(tmp_path):
    """Trained on 'pretrain'-like rows (the last `heldout` never seen), the stand-in reproduces the captions of
    held-out images through MLLMCaptioner; a finished checkpoint of the same config is reused."""
    corpus = _corpus(12)  # 36 images, the last 6 held out
    cfg = CaptionerConfig(**TINY, epochs=60, heldout=6)
    summary = train_generative_captioner(corpus, tmp_path / "captioner", cfg, seed=0, show_progress_bar=False)
    held_out = corpus.select(range(30, 36))
    captions = load_captioner(tmp_path / "captioner")({"image": held_out["image"]})
    assert captions == [CAPTIONS[i.split("-")[0]] for i in held_out["image_id"]]
    assert summary["examples"][0]["caption"] == summary["examples"][0]["truth"]
    assert summary["heldout"]["phrases"] > 0  # scored on the held-out rows (empty scenes here: precision 0)
    again = train_generative_captioner(corpus, tmp_path / "captioner", cfg, seed=0, show_progress_bar=False)
    assert again == summary  # reused, not retrained
    with pytest.raises(ValueError, match="heldout"):
        train_generative_captioner(corpus, tmp_path / "other", CaptionerConfig(**TINY, heldout=30))


def test_caption_cache_refuses_captions_of_a_retrained_captioner_at_the_same_path(tmp_path):
    """The cache's manifest names the captioner's weights: a captioner saved again at the same path (new weights)
    does not reuse the old captions, it fails with the fix; the same checkpoint reloaded reuses them."""
    import torch

    from datasets_scripts.captioning import caption_corpus, captioner_key

    corpus = _corpus(1)
    model, processor = build_captioner(list(CAPTIONS.values()), CaptionerConfig(**TINY))
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    first = caption_corpus(corpus, load_captioner(tmp_path / "captioner"), tmp_path / "cache", show_progress_bar=False)
    assert caption_corpus(corpus, load_captioner(tmp_path / "captioner"), tmp_path / "cache",
                          show_progress_bar=False) == first  # the same checkpoint: the cache holds
    before = captioner_key(load_captioner(tmp_path / "captioner"))
    torch.manual_seed(1)
    retrained, _ = build_captioner(list(CAPTIONS.values()), CaptionerConfig(**TINY), seed=1)
    retrained.save_pretrained(tmp_path / "captioner")
    assert captioner_key(load_captioner(tmp_path / "captioner")) != before
    with pytest.raises(ValueError, match="captions of another run .*captioner"):
        caption_corpus(corpus, load_captioner(tmp_path / "captioner"), tmp_path / "cache", show_progress_bar=False)


def test_caption_precision_parses_generated_and_retrieved_captions():
    scene = json.dumps([{"shape": "circle", "colour": "red", "size": "small", "cell": 0},
                        {"shape": "cross", "colour": "blue", "size": "large", "cell": 4}])
    # LLaVA-style (articles, commas, "and") and retrieval-style captions name the same phrases
    assert caption_phrases("a small red circle, a large blue cross and a small green square") == [
        "small red circle", "large blue cross", "small green square"]
    assert caption_phrases("small red circle and large blue cross") == ["small red circle", "large blue cross"]
    p = caption_precision(["a small red circle, a small blue cross and a large green square"], [scene])
    assert p["phrases"] == 3
    assert p["phrase_precision"] == pytest.approx(100 / 3)  # only the red circle is exact
    assert p["colour_shape_precision"] == pytest.approx(200 / 3)  # the blue cross has the wrong size
    assert p["object_recall"] == 50.0
    empty = caption_precision([""], [scene])  # an empty caption is one wrong phrase, not a free pass
    assert empty["phrases"] == 1 and empty["phrase_precision"] == 0.0
