"""`--negative_study` on the synthetic benchmark: its points, what it reuses of a default run, and a tiny study in
two lanes end to end (each point trained with its negatives, the JSON and the plots, a rerun that trains nothing)."""

import json

import pytest
from spn_recipe.config import RecipeConfig
from spn_recipe.negative_study import (
    NegativeStudy,
    StudyPoint,
    run_negative_study,
    study_points,
)
from spn_recipe.stamps import stamp


def test_points_are_the_types_and_the_counts_the_bank_allows():
    keys = [p.key for p in study_points(4000)]
    assert keys == ["types/target", "types/query", "types/text", "types/reference", "types/target+query",
                    "types/target+text", "types/target+reference", "negatives/in-batch", "negatives/128",
                    "negatives/1000", "negatives/bank", "negatives/bank+pool"]
    small = [p.key for p in study_points(240)]
    assert "negatives/1000" not in small and "negatives/128" in small  # 1000 sampled rows need a larger bank


def test_a_finished_default_run_gives_stage_1_and_plus_n(tmp_path):
    cfg = RecipeConfig.tiny(str(tmp_path), show_progress_bar=False)
    metrics = {"stage 1": {"recall@10": 11.0}, "+N": {"recall@10": 12.0}}
    stamp(tmp_path / "results.json", cfg, results=metrics)
    study = NegativeStudy(cfg, [0, 1], quiet=True)
    target, bank = StudyPoint("in_batch"), StudyPoint("candidate_bank", negatives="bank")
    assert study.reused(target, 0) == metrics["stage 1"] and study.reused(bank, 0) == metrics["+N"]
    assert study.reused(target, 1) is None  # another training seed is trained
    assert study.model_dir(target, 0) == "stage1" and study.model_dir(target, 1) == "negative_study/types/target/seed_1"
    assert study.bank_dir() == tmp_path / "bank_stage1"  # +N's bank, shared
    assert study.negatives(bank) == study.bank_rows - 1
    assert study.negatives(StudyPoint("candidate_bank", negatives="bank + pool")) == study.bank_rows - 1 + 120
    assert study.negatives(StudyPoint("candidate_bank", negatives="in-batch")) == cfg.stage2_batch_size - 1


@pytest.mark.slow
def test_tiny_study_in_two_lanes_then_resumed(tmp_path):
    cfg = RecipeConfig.tiny(str(tmp_path), show_progress_bar=False)
    summary = run_negative_study(cfg, seeds=[0])
    saved = json.loads((tmp_path / "negative_study.json").read_text())
    assert saved["types"].keys() == summary["types"].keys() and len(saved["types"]) == 7
    assert list(saved["curve"]) == ["negatives/in-batch", "negatives/128", "negatives/bank", "negatives/bank+pool"]
    assert [row["negatives"] for row in saved["curve"].values()] == [31, 128, 239, 359]
    assert all(0 <= row["metrics"]["recall@10"]["mean"] <= 100 for row in saved["types"].values())
    assert all((tmp_path / name).stat().st_size > 0 for name in ("negative_types.png", "negatives_curve.png"))
    # each point trained with its own negatives (the loss its model card records)
    cards = {key: (tmp_path / "negative_study" / key / "seed_0" / "README.md").read_text()
             for key in (*saved["types"], *saved["curve"])}
    assert '"negative_types": ["target", "text"]' in cards["types/target+text"]
    assert '"num_negatives": "in-batch"' in cards["negatives/in-batch"]
    assert '"num_negatives": 128' in cards["negatives/128"]
    assert '"bank_size": 240' in cards["negatives/bank"] and '"bank_size": 360' in cards["negatives/bank+pool"]
    assert json.loads((tmp_path / "negative_study" / "bank" / "extra.json").read_text())["fingerprint"][
        "num_images"] == 120  # the pool, stored beside the bank
    points = sorted((tmp_path / "negative_study").glob("*/*/seed_0/point.json"))
    assert len(points) == 11
    stamps = [p.stat().st_mtime_ns for p in points]
    again = run_negative_study(cfg, seeds=[0])
    assert again["types"] == summary["types"] and again["curve"] == summary["curve"]
    assert [p.stat().st_mtime_ns for p in points] == stamps  # resumed: no point trained again
