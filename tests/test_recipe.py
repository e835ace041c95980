"""The embedded default's recipe (`examples/spn_recipe`): a miniature run end to end (rows, results, plots, report,
diagnostics), seed aggregation, and its lanes — the same steps give the same values in one process and split over
two; a lane that dies is an error, not a hang; a plan that cannot run is refused before anything runs."""

import json
import multiprocessing
import types
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from spn_recipe import ROWS, run_default_recipe
from spn_recipe.config import RecipeConfig
from spn_recipe.edit_study import run_edit_writer_study
from spn_recipe.lanes import Step, run_steps
from spn_recipe.noise_study import run_caption_noise_study
from spn_recipe.recipe import recipe_lanes, recipe_steps
from spn_recipe.report import format_table
from spn_recipe.seeds import aggregate_seeds
from spn_recipe.text_form_probe import run_text_form_probe

LANES = (("scale", "combine"), ("offset", "where"))


def _toy_steps(fail: bool = False) -> list[Step]:
    """Four steps; the second lane's `offset` reads the first lane's `scale`, `combine` reads both lanes."""
    def offset(scale):
        if fail:
            raise RuntimeError("offset failed")
        return scale + 1

    def where():
        return {"process": multiprocessing.current_process().name, "threads": torch.get_num_threads()}

    return [
        Step("scale", lambda: 3),
        Step("offset", offset, ("scale",)),
        Step("where", where),
        Step("combine", lambda scale, offset, where: [scale * offset, where["process"]], ("scale", "offset", "where")),
    ]


@pytest.mark.slow
def test_steps_give_the_same_values_in_one_process_and_in_two_lanes(tmp_path):
    one = run_steps(_toy_steps(), LANES)
    assert one.values["combine"] == [12, "MainProcess"] and one.values["offset"] == 4
    assert set(one.seconds) == {"first lane", "second lane"} and set(one.seconds["second lane"]) == {"offset", "where"}
    threads = torch.get_num_threads()
    two = run_steps(_toy_steps(), LANES, in_processes=True, exchange_dir=tmp_path / "lanes", lane_steps=_toy_steps)
    assert {k: v for k, v in two.values.items() if k not in ("where", "combine")} == {"scale": 3, "offset": 4}
    # the second lane's steps ran in a process of their own, with one thread; the first lane received their values
    assert two.values["where"] == {"process": "second-lane", "threads": 1}
    assert two.values["combine"] == [12, "second-lane"]
    assert "offset" in two.seconds["second lane"] and torch.get_num_threads() == threads


@pytest.mark.slow
def test_a_failing_lane_is_an_error_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match="second-lane"):
        run_steps(_toy_steps(), LANES, in_processes=True, exchange_dir=tmp_path / "lanes",
                  lane_steps=_failing_toy_steps)


def _failing_toy_steps() -> list[Step]:  # a module-level function: the spawned lane unpickles it by name
    return _toy_steps(fail=True)


def test_plans_that_cannot_run_are_refused():
    steps = _toy_steps()
    with pytest.raises(ValueError, match="'offset' reads \\['scale'\\], which no earlier step"):
        run_steps([steps[1], steps[0]], LANES)
    with pytest.raises(ValueError, match="must name every step once"):
        run_steps(steps, (("scale",), ("offset", "where")))
    # the first lane would wait for `offset` before `scale`, which `offset` reads
    with pytest.raises(ValueError, match="wait for each other for ever"):
        run_steps(steps, (("combine", "scale"), ("offset", "where")), in_processes=True)


@pytest.mark.parametrize("captioner", ["generative", "retrieval", "oracle"])
def test_the_recipe_plan_runs_in_both_modes(captioner):
    """The README's steps in order, and two lanes that can run them (checked by playing them through); the
    retrieval captioner is the stage-1 model, so its lane trains stage 1 before captioning."""
    cfg = RecipeConfig(captioner=captioner)
    run = types.SimpleNamespace(cfg=cfg, **{name: (lambda *values: None) for name in (
        "stage0", "stage1", "train_captioner", "caption_pool", "positive_scaling", "zero_shot_triplets", "plus_n",
        "plus_n_lora", "plus_p", "plus_p_n", "zero_shot", "caption_precision")})
    steps = recipe_steps(run)
    assert [s.name for s in steps] == ["stage 0", "stage 1", "captioner", "pool captions", "positive scaling",
                                       "zero-shot triplets", "+N", "+N (LoRA)", "+P", "+P+N", "zero-shot",
                                       "caption precision"]
    first, second = recipe_lanes(cfg)
    assert first == ("stage 0", "positive scaling", "+P", "+P+N")
    captioned_after = "stage 1" if captioner == "retrieval" else "captioner"
    assert second.index(captioned_after) < second.index("pool captions")
    assert set(run_steps(steps, (first, second)).values) == {s.name for s in steps}  # the plan's checks pass


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
    # every row's model card holds the row: the evaluation its trainer ran, on the named test split
    for row, directory in (("+N", "stage2_N"), ("+N (LoRA)", "stage2_N_lora"), ("zero-shot", "zero_shot")):
        card = ModelCard.load(run / directory / "README.md")
        assert {r.metric_type: r.metric_value for r in card.data.eval_results} == \
            {k: round(v, 4) for k, v in summary["results"][row].items()}
        assert {r.dataset_split for r in card.data.eval_results} == {"test"} and "stage-2" in card.data.tags

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
    # its data took the zero-shot path: the pool as webdataset shards, converted (same ids), paired at random
    assert [p.name for p in Path(saved["zero_shot_data"]["collection"]).glob("*.tar")] == ["00000.tar"]
    pool = datasets.load_dataset(str(run / "pool_corpus"), "corpus", split="train")["image_id"]
    zero_shot = datasets.load_dataset(saved["zero_shot_data"]["path"], "triplets", split="train")
    assert list(zero_shot["reference_id"]) == pool and set(zero_shot["source"]) == {"generated"}
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
    # texts written from both images: the default's pairs, the editor's texts, the template rows as they were
    study = run_edit_writer_study(cfg)
    assert {row: study["results"][row] for row in ("stage 1", "+P", "zero-shot")} == {
        row: summary["results"][row] for row in ("stage 1", "+P", "zero-shot")}
    assert all(w["same_pairs_as_templates"] for w in study["written_texts"].values())
    written = datasets.load_dataset(str(run / "edit_writer_study" / "generated_random"), "triplets", split="train")
    assert len(written) == 120 and all(len(texts) == 1 for texts in written["modification_texts"])
    assert study["editor"]["heldout"]["texts"] > 0 and (run / "edit_writer_study" / "editor" / "config.json").exists()


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
