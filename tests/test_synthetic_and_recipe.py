"""The synthetic benchmark (unique targets, correct modifications, determinism) and a miniature recipe run."""

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from spn_recipe import ROWS, RecipeConfig, run_default_recipe

from datasets_scripts.synthetic import MODIFICATIONS, build_synthetic


def _objects(scene_json):
    return {(o["shape"], o["colour"], o["size"], o["cell"]) for o in json.loads(scene_json)}


def _change(ref, tgt):
    """The kind of single change that turns scene `ref` into `tgt` (None if it is not exactly one change)."""
    gone, new = ref - tgt, tgt - ref
    if not gone and len(new) == 1:
        return "add"
    if len(gone) == 1 and not new:
        return "remove"
    if len(gone) == 1 and len(new) == 1:
        (s0, c0, z0, p0), (s1, c1, z1, p1) = next(iter(gone)), next(iter(new))
        diffs = [(s0 != s1, "reshape"), (c0 != c1, "recolour"), (z0 != z1, "resize"), (p0 != p1, "move")]
        changed = [name for differs, name in diffs if differs]
        return changed[0] if len(changed) == 1 else None
    return None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("syn") / "bench", seed=3, size="tiny")


def test_galleries_have_unique_targets_and_hard_distractors(bench):
    for split in ("val", "test"):
        corpus = datasets.load_dataset(str(bench), "corpus", split=split)
        triplets = datasets.load_dataset(str(bench), "triplets", split=split)
        scenes = dict(zip(corpus["image_id"], corpus["scene"]))
        keys = [frozenset(_objects(s)) for s in corpus["scene"]]
        assert len(set(keys)) == len(keys)  # every gallery scene is distinct: one correct target per query
        for row in triplets:
            target = _objects(scenes[row["target_id"]])
            matches = [i for i, k in zip(corpus["image_id"], keys) if k == frozenset(target)]
            assert matches == [row["target_id"]]
        # hard distractors: gallery scenes one attribute away from some target
        one_away = sum(
            1 for image_id, s in scenes.items()
            if any(_change(_objects(scenes[t]), _objects(s)) in ("reshape", "recolour", "resize", "move")
                   for t in triplets["target_id"]) and image_id not in triplets["target_id"]
        )
        assert one_away >= len(triplets)


def test_every_modification_is_present_and_correct(bench):
    for split in ("train", "val", "test"):
        corpus = datasets.load_dataset(str(bench), "corpus", split=split)
        scenes = dict(zip(corpus["image_id"], corpus["scene"]))
        triplets = datasets.load_dataset(str(bench), "triplets", split=split)
        assert set(triplets["modification"]) == set(MODIFICATIONS)
        for row in triplets:
            kind = _change(_objects(scenes[row["reference_id"]]), _objects(scenes[row["target_id"]]))
            assert kind == row["modification"], row
            assert row["modification_texts"][0]


def test_pool_and_pretrain_splits(bench):
    train = datasets.load_dataset(str(bench), "corpus", split="train")
    triplets = datasets.load_dataset(str(bench), "triplets", split="train")
    used = set(triplets["reference_id"]) | set(triplets["target_id"])
    assert len(set(train["image_id"]) - used) == 120  # the unlabeled pool
    pretrain = datasets.load_dataset(str(bench), "corpus", split="pretrain")
    assert len(pretrain) == 200 and all(pretrain["caption"])


def test_generator_is_deterministic(bench, tmp_path):
    again = build_synthetic(tmp_path / "again", seed=3, size="tiny")
    other = build_synthetic(tmp_path / "other", seed=4, size="tiny")
    for config in ("triplets", "corpus"):
        a = datasets.load_dataset(str(bench), config, split="test")
        b = datasets.load_dataset(str(again), config, split="test")
        c = datasets.load_dataset(str(other), config, split="test")
        if config == "corpus":
            a, b, c = (d.cast_column("image", datasets.Image(decode=False)) for d in (a, b, c))
        assert a.to_list() == b.to_list()
        assert a.to_list() != c.to_list()


@pytest.mark.slow
def test_miniature_recipe(tmp_path):
    summary = run_default_recipe(RecipeConfig.tiny(str(tmp_path / "run"), show_progress_bar=False))
    assert set(summary["results"]) == set(ROWS)
    for row in ROWS:
        assert set(summary["results"][row]) == {"recall@1", "recall@5", "recall@10", "recall@50"}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["results"] == summary["results"] and "reference removed" in saved["protocol"]
    assert (tmp_path / "run" / "recall_at_k.png").stat().st_size > 0
    assert saved["generated_triplets"] == 2 * 120 and 0 <= saved["caption_accuracy"]["phrase_precision"] <= 100
    html = (tmp_path / "run" / "retrieval_report" / "retrieval_report.html").read_text()
    assert saved["retrieval_report"]["model"] in ROWS and html.count("<img") >= 8 * 9  # 8 queries: reference + top 8
    # each stage changes what it trains, and stage 2 nothing else
    run = tmp_path / "run"

    def changed(before, after):
        a, b = load_file(run / before / "model.safetensors"), load_file(run / after / "model.safetensors")
        return {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}

    for start, stage1 in (("stage0", "stage1"), ("stage0", "stage1_P")):
        assert {"text_model", "text_projection", "vision_model", "visual_projection"} <= changed(start, stage1)
    for stage1, stage2 in (("stage1", "stage2_N"), ("stage1_P", "stage2_PN")):
        assert changed(stage1, stage2) == {"text_model", "text_projection"}
    # the LoRA row saves an adapter of the text side only, never a full model
    assert (run / "stage2_N_lora" / "adapter_model.safetensors").exists()
    assert not (run / "stage2_N_lora" / "model.safetensors").exists()
    adapter = load_file(run / "stage2_N_lora" / "adapter_model.safetensors")
    assert adapter and not any("vision_model" in k or "visual_projection" in k for k in adapter)
    # same seed, same numbers (the benchmark is reused from the first run's cache)
    again = run_default_recipe(RecipeConfig.tiny(str(tmp_path / "run"), show_progress_bar=False))
    assert again["results"] == summary["results"]
