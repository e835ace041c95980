"""Diagnostic `--edit_writer_study`: modification texts written from both images by a two-image stand-in editor
(`generative_editor`: trained only on `pretrain` pairs, described by the world's own grammar) instead of the
templates over two captions, with the default run's pairs — +P (rank-window pairs, with the annotated triplets) and
zero-shot (the pool collection's random pairs, generated triplets only) — against the default's template rows
(docs/positives.md: modification texts written from both images)."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import datasets

from datasets_scripts.load import load_cir_data, load_training_triplets
from datasets_scripts.positive_scaling import generate_edited_triplets
from datasets_scripts.synthetic_edits import difference, edit_scores, scene_from_json
from modeling_spn4cir.storage import atomic_write_json

from .captions import pairing_encoder
from .config import RecipeConfig, say
from .generative_editor import EditorConfig, load_editor, train_generative_editor
from .lanes import Step, one_thread_per_lane, run_steps
from .report import format_table
from .stamps import config_key, finished
from .steps import TRIPLET_COLUMNS, RecipeRun

STUDY = "edit_writer_study"
ROWS = ("stage 1", "+P", "+P (written texts)", "zero-shot", "zero-shot (written texts)")


def study_steps(run: RecipeRun) -> list[Step]:
    return [
        Step("editor", partial(_editor, run)),
        Step("written rank-window texts", partial(_written, run, "window"), after=("editor",)),
        Step("written random-pair texts", partial(_written, run, "random"), after=("editor",)),
        Step("+P (written texts)", partial(_plus_p, run), ("written rank-window texts",)),
        Step("zero-shot (written texts)", partial(_zero_shot, run), ("written random-pair texts",)),
    ]


LANES = (("editor", "written rank-window texts", "+P (written texts)"),
         ("written random-pair texts", "zero-shot (written texts)"))


def _editor_config(cfg: RecipeConfig) -> EditorConfig:
    return EditorConfig(**cfg.editor_config)


def _lane_study_steps(cfg: RecipeConfig) -> list[Step]:
    return study_steps(RecipeRun(replace(cfg, show_progress_bar=False), quiet=True))


def _editor(run: RecipeRun) -> dict:
    """The stand-in editor, its vision tower starting from the default run's captioner where there is one (both
    trained on `pretrain` images only)."""
    captioner = run.out / "captioner"
    summary = train_generative_editor(run.corpus["pretrain"], run.out / STUDY / "editor", _editor_config(run.cfg),
                                      run.cfg.seed, show_progress_bar=run.cfg.show_progress_bar,
                                      vision_from=captioner if (captioner / "config.json").exists() else None)
    scores = summary["heldout"]
    say(f"editor on held-out 'pretrain' pairs: {scores['clause_precision']:.1f}% of its clauses are true, "
        f"{scores['clause_recall']:.1f}% of the true clauses written, {scores['exact']:.1f}% exact")
    return summary


def _written(run: RecipeRun, pairing: str) -> dict:
    """The editor's texts for the default's pairs: `"window"`, the +P pairs (the stage-0 model's rank window over
    the pool, as positive scaling pairs it); `"random"`, the zero-shot row's random pairs of the pool collection.
    Returns the triplets, the dataset's path, the texts' scores against the scene graph, and whether the pairs are
    the template row's."""
    window = pairing == "window"
    corpus = run.pool if window else load_cir_data(str(run.out / "pool_corpus")).corpus["train"]
    name = f"{STUDY}/generated_{pairing}"
    scaled = generate_edited_triplets(
        corpus, load_editor(run.out / STUDY / "editor", _editor_config(run.cfg)), run.out / name,
        encoder=pairing_encoder(run.out, run.processor, run.tokenizer) if window else None,
        rank_window=run.rank_window() if window else None, k=run.cfg.k, seed=run.cfg.seed,
        edit_cache_dir=run.out / f"{name}_cache", batch_size=256, show_progress_bar=run.cfg.show_progress_bar,
        overwrite=True)
    template = datasets.load_dataset(str(run.out / ("generated" if window else "generated_zero_shot")), "triplets",
                                     split="train")
    pairs = [(t["reference_id"], t["target_id"]) for t in scaled.triplets]
    scenes = dict(zip(run.pool["image_id"], run.pool["scene"]))
    truths = [difference(scene_from_json(scenes[r]), scene_from_json(scenes[t])) for r, t in pairs]
    scores = edit_scores([t["modification_texts"][0] for t in scaled.triplets], truths)
    say(f"written texts ({pairing} pairs): {scores['clause_precision']:.1f}% of clauses true, "
        f"{scores['clause_recall']:.1f}% of the true clauses written")
    return {"triplets": scaled.triplets, "path": str(scaled.path), "scores": scores,
            "same_pairs_as_templates": pairs == list(zip(template["reference_id"], template["target_id"])),
            "example": {"written": scaled.triplets[0]["modification_texts"][0],
                        "template": template[0]["modification_texts"][0]}}


def _plus_p(run: RecipeRun, written: dict) -> dict:
    """Stage 1 from stage 0 on the annotated triplets plus the written rank-window triplets (the +P row's)."""
    train = run.with_annotated(written["triplets"])
    return run.evaluate("+P (written texts)", run.scored("stage0", "in_batch", train, f"{STUDY}/stage1_P"))


def _zero_shot(run: RecipeRun, written: dict) -> dict:
    """Stage 1 then stage 2 on the written random-pair triplets only (the zero-shot row's)."""
    train = load_training_triplets([written["path"]], columns=TRIPLET_COLUMNS)
    run.train("stage0", "in_batch", train.triplets, f"{STUDY}/zero_shot_stage1", corpus=train.corpora)
    return run.evaluate("zero-shot (written texts)", run.scored(f"{STUDY}/zero_shot_stage1", "candidate_bank",
                                                               train.triplets, f"{STUDY}/zero_shot",
                                                               corpus=train.corpora))


def run_edit_writer_study(cfg: RecipeConfig) -> dict:
    """The study on a finished default run in `cfg.output_dir` (its stage 0, pairs, pool collection and rows); in
    two lanes with `cfg.workers > 1`. Writes OUTPUT_DIR/edit_writer_study.json and prints the table."""
    out = Path(cfg.output_dir)
    default = finished(out / "results.json", cfg)
    if default is None:
        raise FileNotFoundError(f"{out / 'results.json'} is not a finished default run of this config: run "
                                f"`python examples/run_cir.py --output_dir {out}` first.")
    start = time.perf_counter()
    with one_thread_per_lane(cfg.workers > 1):
        run = RecipeRun(cfg)
        done = run_steps(study_steps(run), LANES, in_processes=cfg.workers > 1, exchange_dir=out / STUDY / "lanes",
                         lane_steps=partial(_lane_study_steps, cfg))
    values = done.values
    results = {row: default["results"][row] for row in ("stage 1", "+P", "zero-shot")}
    results |= {row: values[row] for row in ("+P (written texts)", "zero-shot (written texts)")}
    summary = {
        "protocol": default["protocol"], "results": {row: results[row] for row in ROWS},
        "editor": {k: values["editor"][k] for k in ("heldout", "config", "pairs", "parameters", "train_seconds",
                                                    "examples")},
        "written_texts": {p: {k: v for k, v in values[f"written {p} texts"].items() if k not in ("triplets", "path")}
                          for p in ("rank-window", "random-pair")},
        "seconds": round(time.perf_counter() - start, 1), "seconds_by_step": done.seconds, "config": config_key(cfg),
    }
    atomic_write_json(out / f"{STUDY}.json", summary, indent=2)
    print("\nTexts written from both images vs. templates over two captions (test split; the default run's pairs)\n")
    print(format_table(summary["results"], rows=ROWS))
    say(f"wrote {out / f'{STUDY}.json'} in {summary['seconds'] / 60:.1f} min")
    return summary


__all__ = ["EditorConfig", "run_edit_writer_study", "study_steps"]
