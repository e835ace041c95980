"""The two-image edit writer stand-in of the `--edit_writer_study` diagnostic: a tiny LLaVA trained only on pairs of
`pretrain` images described by the world's grammar, saved like a Hub checkpoint and used through MLLMEditWriter
(AutoProcessor, a chat turn with both images, generate)."""

import datasets
import pytest
from spn_recipe.generative_editor import (
    EditorConfig,
    _prompt_ids,
    build_editor,
    load_editor,
    pretrain_pairs,
    train_generative_editor,
)

from datasets_scripts.synthetic import build_synthetic
from datasets_scripts.synthetic_edits import difference, parse_edit, scene_from_json

TINY = {"hidden": 32, "heads": 2, "vision_layers": 1, "text_layers": 1, "epochs": 1, "batch_size": 16, "heldout": 40,
        "max_new_tokens": 8, "pairs_per_image": 1}


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    path = build_synthetic(tmp_path_factory.mktemp("syn") / "bench", seed=1, size="tiny")
    return datasets.load_dataset(str(path), "corpus", split="pretrain")


def test_training_pairs_are_pretrain_pairs_described_by_the_grammar(pretrain):
    scenes = list(pretrain["scene"])
    pairs = pretrain_pairs(scenes, range(160), 2, seed=0)
    assert len(pairs) >= 300 and all(0 <= r < 160 and 0 <= t < 160 and r != t for r, t, _ in pairs)
    for r, t, text in pairs:  # the text says exactly the modification from the reference to the target
        assert parse_edit(text) == difference(scene_from_json(scenes[r]), scene_from_json(scenes[t]))
    assert pairs == pretrain_pairs(scenes, range(160), 2, seed=0) != pretrain_pairs(scenes, range(160), 2, seed=1)
    # near=True: each row's first partner is one of the nearest of its candidates, the second a random one
    mixed = pretrain_pairs(scenes, range(160), 2, seed=0, near=True, candidates=40)
    first, second = {}, {}
    for r, t, text in mixed:
        (second if r in first else first)[r] = len(parse_edit(text))
    assert sum(first.values()) / len(first) < 0.75 * sum(second.values()) / len(second)


def test_training_prompt_is_the_one_the_edit_writer_sends_with_both_images(pretrain, tmp_path):
    cfg = EditorConfig(**TINY)
    model, processor = build_editor(["remove the red circle"], cfg)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    editor = load_editor(tmp_path, cfg)
    sent = []
    generate = editor.model.generate
    editor.model.generate = lambda **inputs: sent.append(inputs) or generate(**inputs)
    reference, target = pretrain[0]["image"], pretrain[1]["image"]
    editor({"reference_image": [reference], "target_image": [target], "reference_id": ["a"], "target_id": ["b"]})
    (inputs,) = sent
    assert inputs["input_ids"][0].tolist() == _prompt_ids(processor, reference).tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert inputs["input_ids"][0].tolist().count(image_token) == 2 * (64 // 16) ** 2  # both images' patches
    assert len(inputs["pixel_values"]) == 2  # reference, then target


def test_the_editor_trains_on_pretrain_pairs_only_and_is_scored_on_held_out_ones(pretrain, tmp_path):
    cfg = EditorConfig(**{**TINY, "heldout": 16})
    pretrain = pretrain.select(range(64))
    summary = train_generative_editor(pretrain, tmp_path / "editor", cfg, seed=0, show_progress_bar=False)
    assert summary["pairs"] <= 64 - 16  # one partner per training image, equal scenes left out
    assert summary["heldout"]["texts"] > 12 and 0 <= summary["heldout"]["clause_precision"] <= 100
    assert (tmp_path / "editor" / "config.json").exists()
    assert train_generative_editor(pretrain, tmp_path / "editor", cfg, seed=0) == summary  # reused, not retrained
