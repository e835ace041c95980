"""The synthetic benchmark (unique targets, correct modifications, determinism) and a miniature recipe run."""

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from spn_recipe import ROWS, RecipeConfig, run_default_recipe
from spn_recipe.generative_captioner import caption_phrases, caption_precision
from spn_recipe.noise_study import run_caption_noise_study
from spn_recipe.report import format_table
from spn_recipe.seeds import aggregate_seeds
from spn_recipe.text_form_probe import run_text_form_probe

from datasets_scripts.synthetic import MODIFICATIONS, build_synthetic, phrase_vocabulary, scene_captions


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
    # k=1 as in the original: one generated triplet per pool image, rank-window pairs for +P, random ones for zero-shot
    assert saved["generated_triplets"] == saved["zero_shot_triplets"] == 120
    assert saved["threads_per_lane"] == 1 and set(saved["seconds_by_step"]) == {"first lane", "second lane"}
    # the pool is captioned by the generative stand-in (trained on 'pretrain' and scored on its held-out part),
    # and the stage-1 model's retrieval captions are scored next to it
    assert set(saved["caption_precision"]) == {"generative", "retrieval"}
    assert 0 <= saved["caption_precision"]["generative"]["phrase_precision"] <= 100
    assert (tmp_path / "run" / "captioner" / "config.json").exists()
    assert "phrase_precision" in saved["captioner_heldout"]["heldout"]
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
    # zero-shot: stage 1 then stage 2 on generated triplets only (no annotated triplet), from stage 0
    assert {"text_model", "vision_model"} <= changed("stage0", "zero_shot_stage1")
    assert changed("zero_shot_stage1", "zero_shot") == {"text_model", "text_projection"}
    # same seed, same numbers, from scratch in another directory (nothing reused but nothing differs)
    again = run_default_recipe(RecipeConfig.tiny(str(tmp_path / "again"), show_progress_bar=False))
    assert again["results"] == summary["results"]
    assert again["caption_precision"] == summary["caption_precision"]

    # the caption-noise study on the finished run: two levels in two lanes, then a rerun reuses both levels
    cfg = RecipeConfig.tiny(str(run), show_progress_bar=False)
    study = run_caption_noise_study(cfg, levels=(0.0, 0.5))
    clean, noisy = study["points"]
    assert clean["corrupted"] == 0.0 and clean["phrase_precision"] == 100.0  # scene-graph captions, untouched
    assert noisy["corrupted"] == 0.5 and 40.0 <= noisy["phrase_precision"] <= 60.0
    assert study["reference"]["stage 1"] == summary["results"]["stage 1"]  # the default run's rows, not retrained
    assert (run / "caption_noise_study.png").stat().st_size > 0
    points = [run / "noise_study" / name / "point.json" for name in ("corrupt_00", "corrupt_50")]
    stamps = [p.stat().st_mtime_ns for p in points]
    assert run_caption_noise_study(cfg, levels=(0.0, 0.5))["points"] == study["points"]
    assert [p.stat().st_mtime_ns for p in points] == stamps  # resumed: no level trained again
    # the text-form probe: its annotated-text column is the table; the other column asks with full descriptions
    probe = run_text_form_probe(cfg)
    assert {row: v["annotated texts"] for row, v in probe["rows"].items()} == summary["results"]
    assert " instead of " in probe["example"]["generated form"] != probe["example"]["annotated"]


def test_scene_captions_corrupt_exactly_the_requested_share_of_phrases(bench):
    pool = datasets.load_dataset(str(bench), "corpus", split="train")
    scenes = dict(zip(pool["image_id"], pool["scene"]))
    clean = scene_captions(scenes)
    assert caption_precision(list(clean.values()), list(scenes.values()))["phrase_precision"] == 100.0
    for level in (0.25, 0.5, 0.75):
        noisy = scene_captions(scenes, corrupt=level, seed=1)
        total = sum(len(caption_phrases(c)) for c in clean.values())
        wrong = sum(a != b for i in clean for a, b in zip(caption_phrases(clean[i]), caption_phrases(noisy[i])))
        assert wrong == round(level * total)  # exactly that share of phrases changed ...
        precision = caption_precision(list(noisy.values()), list(scenes.values()))
        assert abs(precision["phrase_precision"] - 100 * (1 - level)) < 100 / total + 1e-9  # ... and each is wrong
        assert all(p in phrase_vocabulary() for c in noisy.values() for p in caption_phrases(c))
        assert all(len(set(caption_phrases(c))) == len(caption_phrases(c)) for c in noisy.values())
    assert scene_captions(scenes, 0.5, seed=1) == scene_captions(scenes, 0.5, seed=1) != scene_captions(scenes, 0.5, 2)
    with pytest.raises(ValueError, match="fraction"):
        scene_captions(scenes, corrupt=1.5)


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


def test_seed_aggregation_and_table():
    runs = [{"config": {"seed": s}, "results": {"stage 1": {"recall@1": r, "recall@5": 1.0, "recall@10": 2.0,
                                                            "recall@50": 3.0}},
             "caption_precision": {"generative": {"phrase_precision": r, "colour_shape_precision": 50.0}}}
            for s, r in ((0, 10.0), (1, 20.0), (2, 30.0))]
    agg = aggregate_seeds(runs)
    assert agg["seeds"] == [0, 1, 2]
    assert agg["results"]["stage 1"]["recall@1"]["mean"] == 20.0
    assert agg["results"]["stage 1"]["recall@1"]["std"] == pytest.approx(10.0)  # sample std (n - 1)
    assert agg["results"]["stage 1"]["recall@5"]["std"] == 0.0
    assert agg["caption_precision"]["generative"]["phrase_precision"]["mean"] == 20.0
    assert "stage 1" not in agg["minus_stage_1"]  # the paired differences: one row against stage 1, seed by seed
    runs[2]["results"]["+N"] = {k: v + 1.0 for k, v in runs[2]["results"]["stage 1"].items()}
    for run in runs[:2]:
        run["results"]["+N"] = {k: v + 3.0 for k, v in run["results"]["stage 1"].items()}
    paired = aggregate_seeds(runs)["minus_stage_1"]["+N"]["recall@1"]
    assert paired["values"] == [3.0, 3.0, 1.0] and paired["mean"] == pytest.approx(7 / 3)
    table = format_table(agg["results"], rows=["stage 1"])
    assert "| stage 1 | 20.00 ± 10.00 | 1.00 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 |" in table
