"""The zero-shot experiment (docs/zero_shot.md) end to end: the page's own commands, run on tiny local
stand-ins — a folder of images for CC3M, tiny official FashionIQ / CIRR / CIRCO layouts, a tiny CLIP and a tiny
LLaVA saved in directories named like the Hub ids the commands use — with CPU overrides only."""

import json
import re
import shlex
import shutil
from pathlib import Path

import datasets
import generate_triplets
import pytest
import run_cir
import torch
from conftest import save_tiny_llava, tiny_circo_layout, write_png
from safetensors.torch import load_file

from datasets_scripts.images import main as images_main

ROOT = Path(__file__).resolve().parents[1]
ZERO_SHOT_PAGE = ROOT / "docs" / "zero_shot.md"
# What the tiny stand-ins need on a CPU: small batches, one epoch, no fp16, short captions.
OVERRIDES = {
    "run_cir.py": ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--num_train_epochs",
                   "1", "--fp16", "false", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"],
    "generate_triplets.py": ["--max_new_tokens", "6", "--batch_size", "8"],
    "datasets_scripts.images": [],
}
ENTRY_POINTS = {"run_cir.py": run_cir.main, "generate_triplets.py": generate_triplets.main,
                "datasets_scripts.images": images_main}


def readme_commands() -> list[list[str]]:
    """The commands of the zero-shot page's block, each as its arguments after the script."""
    text = ZERO_SHOT_PAGE.read_text()
    block = re.search(r"# Zero-shot CIR\n.*?```bash\n(.*?)```", text, re.DOTALL).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _run(command: list[str]):
    script = next(word for word in command if word.endswith(tuple(ENTRY_POINTS)))
    name = next(key for key in ENTRY_POINTS if script.endswith(key))
    return ENTRY_POINTS[name](command[command.index(script) + 1:] + OVERRIDES[name])


@pytest.fixture
def stand_ins(tmp_path, fiq_root, cirr_root, tiny_clip_dir, monkeypatch):
    """The working directory of the zero-shot page's commands, with every path they name."""
    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    for i in range(12):  # "CC3M": a folder of images
        write_png(work / "cc3m" / f"{i:03d}.png", 500 + i, size=(16, 16))
    shutil.move(fiq_root, work / "fashionIQ_dataset")
    shutil.move(cirr_root, work / "CIRR")
    tiny_circo_layout(work / "CIRCO", images=(12, 13, 14, 15, 16), val=[
        {"id": 0, "reference_img_id": 12, "target_img_id": 13, "gt_img_ids": [13, 14], "relative_caption": "is red",
         "shared_concept": "a car", "semantic_aspects": ["addition"]},
        {"id": 1, "reference_img_id": 15, "target_img_id": 16, "gt_img_ids": [16], "relative_caption": "add a dog",
         "shared_concept": "a dog", "semantic_aspects": ["cardinality", "addition"]}],
        test=[{"id": 0, "reference_img_id": 14, "relative_caption": "is blue", "shared_concept": "a car"}])
    shutil.copytree(tiny_clip_dir, work / "openai" / "clip-vit-large-patch14")  # the CLIP the configs start from
    shutil.copytree(tiny_clip_dir, work / "openai" / "clip-vit-base-patch32")  # the too-long fallback's tokenizer
    llava = save_tiny_llava(work / "llava-hf" / "llava-1.5-7b-hf", ["a", "red", "dog", "blue", "car", "and", "more"])
    generation = json.loads((llava / "generation_config.json").read_text())  # random weights: never an empty caption
    generation |= {"min_new_tokens": 2, "suppress_tokens": list(range(5))}  # the special tokens
    (llava / "generation_config.json").write_text(json.dumps(generation))
    (work / "examples").symlink_to(ROOT / "examples")  # the commands run from the repository's root
    monkeypatch.chdir(work)
    return work


@pytest.mark.slow
def test_the_readme_zero_shot_experiment_runs_on_tiny_stand_ins(stand_ins):
    commands = readme_commands()
    assert [c[c.index(next(w for w in c if w.endswith(tuple(ENTRY_POINTS))))].split("/")[-1] for c in commands] == [
        "datasets_scripts.images", "generate_triplets.py", "run_cir.py", "run_cir.py", "run_cir.py", "run_cir.py"]
    results = [_run(command) for command in commands]
    corpus = datasets.load_dataset("cc-fiq-corpus", "corpus", split="train")
    triplets = datasets.load_dataset("zeroshot-fiq-triplets", "triplets", split="train")
    assert len(corpus) == 12 and len(triplets) == 12  # every image a reference, one random target (k=1)
    assert set(triplets["reference_id"]) | set(triplets["target_id"]) <= set(corpus["image_id"])
    assert all(texts == [triplets["target_caption"][i]] for i, texts in enumerate(triplets["modification_texts"]))
    baseline, stage1, stage2, final = results[2:]
    for trained in (stage1, stage2):  # the generated triplets only, not one FashionIQ triplet
        assert trained["train_triplets"] == 12 and trained["train_datasets"] == ["zeroshot-fiq-triplets"]
        assert trained["eval_protocol"].startswith("FashionIQ val") and "reference removed" in trained["eval_protocol"]
    bank = json.loads(Path("outputs/zeroshot-fiq-bank/bank.json").read_text())
    assert set(bank["image_ids"]) == set(triplets["reference_id"]) | set(triplets["target_id"])
    state = json.loads(next(Path("outputs/zeroshot-fiq-stage1").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["best_metric"] == stage1["eval_average"]  # the checkpoint chosen on FashionIQ val
    for scored in (baseline, final):  # FashionIQ, CIRR and CIRCO in one run, each named with its protocol
        assert {"eval_fashioniq_remove_reference_average", "eval_cirr_average", "eval_cirr_recall_subset@1",
                "eval_circo_map@10", "eval_circo_recall@5", "eval_circo_semantic_map@10_addition"} <= set(scored)
        assert "reference removed" in scored["eval_fashioniq_remove_reference_protocol"]
        assert scored["eval_cirr_protocol"].startswith("CIRR") and "reference kept" in scored["eval_circo_protocol"]
    before = load_file("outputs/zeroshot-fiq-stage1/model.safetensors")  # stage 2 trained the query side only
    after = load_file("outputs/zeroshot-fiq-stage2/model.safetensors")
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"text_model", "text_projection"}
    card = (Path("outputs/zeroshot-fiq-stage2") / "README.md").read_text()
    assert "Zero-shot references" in card and "recall@5 65.42" in card and "SEARLE" in card
