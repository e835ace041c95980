"""The SPN authors' release -> model zoo + datasets (`trainers.zoo`, `datasets_scripts.paper_triplets`,
`examples/convert_paper_checkpoints.py`), on a fake release built from the parity fixtures in the authors' layout:
stage 1 under `data/<backbone>/`, stage 2 under `checkpoints/<fiq|cirr>_<clip|tgcir|blip|blip2>/` (SPN4CIR README)."""

import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from conftest import FIXTURES, solid_images, tiny_tokenizer
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor

import modeling_spn4cir  # noqa: F401  (registers the families with the Auto classes)
from datasets_scripts.common import AnnotationError, SplitData, write_cir_dataset
from datasets_scripts.paper_triplets import (
    convert_extend_file,
    parse_extend_name,
    read_dedup_map,
)
from modeling_spn4cir.storage import OutputDirError
from trainers.zoo import build_zoo, reported_metrics

CLIP_ONLY = {
    "data/clip4cir/fiq_stage1.pt": "parity_clip4cir/clip4cir_rn_stage1.pt",
    "checkpoints/fiq_clip/best.pt": "parity_clip4cir/spn4cir_clip4cir_rn_stage2.pt",
    # no extension, no telling name: recognized by its content
    "checkpoints/cirr_clip/weights": "parity_clip4cir/spn4cir_clip4cir_vit_stage2.pt",
    "data/clip4cir/combiner.pt": "parity_clip4cir/clip4cir_combiner.pt",
}
ALL_FAMILIES = {
    **CLIP_ONLY,
    "data/tgcir/cirr_stage1.pt": "parity_tgcir/spn4cir_tgcir_stage1.pt",
    "checkpoints/cirr_tgcir/best.pt": "parity_tgcir/spn4cir_tgcir_stage2.pt",
    "data/blip4cir/fiq_stage1.pt": "parity_blip4cir/spn4cir_blip4cir_stage1.pt",
    "checkpoints/fiq_blip/best.pt": "parity_blip4cir/spn4cir_blip4cir_stage2.pt",
    "data/blip24cir/cirr_stage1.pt": "parity_sprc/sprc_stage1.pt",
    "checkpoints/cirr_blip2/best.pt": "parity_sprc/sprc_stage2.pt",
}
FIQ_TRAIN = [f"B{i:03d}" for i in range(10)]
CIRR_TRAIN = [f"train-{i}-0-img0" for i in range(8)]
# SPN's formats: zscir/get_cir_data.py writes these records (FashionIQ with --p_list 2: one template).
FIQ_EXTEND = [
    {"target": "B005", "candidate": "B000", "captions": ["red short dress"], "caption1": "blue long dress",
     "caption2": "red short dress"},
    {"target": "B001", "candidate": "B007", "captions": ["white shirt"], "caption1": "black tee",
     "caption2": "white shirt"},
]
CIRR_EXTEND = [
    {"target_hard": "train-3-0-img0", "reference": "train-0-0-img0",
     "caption": ["two cats instead of a dog", "Unlike a dog, I want two cats"], "pairid": 0,
     "img_set": {"members": ["xxx"]}, "caption1": "a dog", "caption2": "two cats", "llm_caption": "add a cat"},
    {"target_hard": "train-1-0-img0", "reference": "train-6-0-img0",
     "caption": ["a beach instead of a city", "Unlike a city, I want a beach"], "pairid": 0,
     "img_set": {"members": ["xxx"]}, "caption1": "a city", "caption2": "a beach", "llm_caption": "go to the sea"},
]
# optimized_images.json: [imagenames, imagepaths, imagename2id]; B002 and B009 are copies of B001 and B004.
FIQ_OPTIMIZED = [["B000", "B001", "B003", "B004"], ["fashionIQ_dataset/images/B000.png"] * 4,
                 {"B000": 0, "B001": 1, "B002": 1, "B003": 2, "B004": 3, "B009": 3}]


# The fake release is made of the tiny parity checkpoints: their image towers stand in for the paper's (RN50x4, ...),
# as each family's converter names them from the weights (`backbone()`).
FIXTURE_BACKBONES = {"clip4cir": "ModifiedResNet-1-1-1-1-w8 64px", "tgcir": "ViT-w64-l2/16 64px",
                     "blip4cir": "ViT-w64-l2/16 64px", "sprc": "ViT-w64-l2/16 64px"}
VIT_CLIP4CIR = "spn4cir-clip4cir-vit-w64-l2-16-64px"  # the ViT CLIP4CIR fixture: not the paper's backbone


@pytest.fixture(autouse=True)
def fixture_backbones_stand_in_for_the_papers(monkeypatch):
    from dataclasses import replace

    from modeling_spn4cir.families import FAMILIES

    for name, label in FIXTURE_BACKBONES.items():
        spec = FAMILIES[name]
        monkeypatch.setitem(FAMILIES, name, replace(spec, paper=replace(spec.paper, backbone_label=label)))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fashioniq(root: Path) -> Path:
    """A tiny converted FashionIQ: train (10 images, 2 annotated triplets) and val (6 images of 'dress')."""
    images = [_png(i) for i in solid_images(16, size=32, seed=3)]
    train = SplitData(
        corpus=[{"image_id": i, "image_bytes": images[n], "category": "dress"} for n, i in enumerate(FIQ_TRAIN)],
        triplets=[{"reference_id": "B000", "target_id": "B001", "modification_texts": ["is red", "is short"],
                   "category": "dress", "source": "annotated"},
                  {"reference_id": "B003", "target_id": "B004", "modification_texts": ["is blue", "has sleeves"],
                   "category": "dress", "source": "annotated"}])
    val_ids = [f"V{i:03d}" for i in range(6)]
    val = SplitData(
        corpus=[{"image_id": i, "image_bytes": images[10 + n], "category": "dress"} for n, i in enumerate(val_ids)],
        triplets=[{"reference_id": val_ids[i], "target_id": val_ids[(i + 1) % 6], "category": "dress",
                   "modification_texts": ["is red", "is longer"], "source": "annotated"} for i in range(6)])
    return write_cir_dataset(root / "fashioniq-hf", {"train": train, "val": val},
                             corpus_extra={"category": datasets.Value("string")},
                             triplet_extra={"category": datasets.Value("string")})


def _cirr(root: Path) -> Path:
    images = [_png(i) for i in solid_images(8, size=32, seed=5)]
    train = SplitData(corpus=[{"image_id": i, "image_bytes": images[n]} for n, i in enumerate(CIRR_TRAIN)],
                      triplets=[{"reference_id": CIRR_TRAIN[0], "target_id": CIRR_TRAIN[1],
                                 "modification_texts": ["add a dog"], "source": "annotated",
                                 "group_members": CIRR_TRAIN[:6], "query_id": "7"}])
    return write_cir_dataset(root / "cirr-hf", {"train": train},
                             triplet_extra={"group_members": datasets.List(datasets.Value("string")),
                                            "query_id": datasets.Value("string")})


def _release(root: Path, checkpoints: dict) -> Path:
    for target, fixture in checkpoints.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / fixture, root / target)
    files = {
        "fashionIQ_dataset/captions/cap.extend_clip.train.json": FIQ_EXTEND,
        "fashionIQ_dataset/captions/cap.extend_clip_llm.train.json": [
            dict(FIQ_EXTEND[0], llm_caption="make it red and short")],
        "cirr_dataset/cirr/captions/cap.rc2.train.extend_blip2.json": CIRR_EXTEND,
        "fashionIQ_dataset/optimized_images.json": FIQ_OPTIMIZED,
        "mm_data/fiq/fashioniq_it_llava_5.json": [{"image_id": "B000", "caption": "blue long dress",
                                                   "image_path": "fashionIQ_dataset/images/B000.png"}],
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.bin").write_bytes(b"\x00\x01 not a checkpoint")
    return root


def _tokenizers(tmp_path: Path) -> dict:
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    return {"clip4cir": str(tmp_path / "tok"), "tgcir": str(tmp_path / "tok"),
            "blip4cir": str(FIXTURES / "parity_blip4cir" / "vocab.txt"),
            "sprc": str(FIXTURES / "parity_sprc" / "vocab.txt")}


def _eval_results(model_dir: Path) -> dict:
    card = ModelCard.load(model_dir / "README.md")
    return {(r.metric_type, r.metric_name.rsplit(" ", 1)[1], r.dataset_split): r.metric_value
            for r in card.data.eval_results}


# ------------------------------------------------------------------------------------------ datasets
def test_extend_files_give_the_rows_the_original_trains_on_with_plus(tmp_path):
    release = _release(tmp_path / "release", {})
    fiq, cirr = _fashioniq(tmp_path), _cirr(tmp_path)
    report = build_zoo(release, tmp_path / "zoo", fashioniq_dir=fiq, cirr_dir=cirr)
    out = tmp_path / "zoo" / "datasets"
    assert sorted(p.name for p in out.iterdir()) == [
        "spn4cir-cirr-scaled-triplets-blip2", "spn4cir-cirr-scaled-triplets-blip2-llm",
        "spn4cir-fiq-scaled-triplets-clip", "spn4cir-fiq-scaled-triplets-clip-llm"]

    # run_cir.py --extra_triplets: annotated train triplets, then the extend rows in file order (the original's
    # `self.triplets.extend(extend_triplets)`), texts as CIRDataset reads them
    annotated = datasets.load_dataset(str(fiq), "triplets", split="train")
    generated = datasets.load_dataset(str(out / "spn4cir-fiq-scaled-triplets-clip"), "triplets", split="train")
    rows = [(r["reference_id"], r["target_id"], r["modification_texts"], r["source"])
            for r in datasets.concatenate_datasets([annotated.select_columns(list(generated.features)[:4]),
                                                    generated.select_columns(list(generated.features)[:4])])]
    assert rows == [("B000", "B001", ["is red", "is short"], "annotated"),
                    ("B003", "B004", ["is blue", "has sleeves"], "annotated"),
                    ("B000", "B005", ["red short dress"], "generated"),
                    ("B007", "B001", ["white shirt"], "generated")]
    assert set(generated["backbone"]) == {"clip"} and set(generated["family"]) == {"clip4cir"}
    assert generated["llm"] == [False, False]
    # --llmcap with CLIP4CIR reads the `_llm` file and trains on its LLM text alone
    clip_llm = datasets.load_dataset(str(out / "spn4cir-fiq-scaled-triplets-clip-llm"), "triplets", split="train")
    assert clip_llm["modification_texts"] == [["make it red and short"]] and clip_llm["llm"] == [True]
    assert generated["reference_caption"] == ["blue long dress", "black tee"]
    corpus = datasets.load_dataset(str(out / "spn4cir-fiq-scaled-triplets-clip"), "corpus", split="train")
    assert corpus["image_id"] == ["B000", "B005", "B007", "B001"]  # the images the triplets use, from the benchmark
    original = datasets.load_dataset(str(fiq), "corpus", split="train")
    assert corpus[1]["image"].tobytes() == original[5]["image"].tobytes()

    # CIRR: the caption list (both templates); --llmcap for blip2 keeps caption[1] beside the LLM text
    plain = datasets.load_dataset(str(out / "spn4cir-cirr-scaled-triplets-blip2"), "triplets", split="train")
    llm = datasets.load_dataset(str(out / "spn4cir-cirr-scaled-triplets-blip2-llm"), "triplets", split="train")
    assert plain["reference_id"] == llm["reference_id"] == ["train-0-0-img0", "train-6-0-img0"]
    assert plain["target_id"] == ["train-3-0-img0", "train-1-0-img0"]
    assert plain["modification_texts"] == [CIRR_EXTEND[0]["caption"], CIRR_EXTEND[1]["caption"]]
    assert llm["modification_texts"] == [["add a cat", "Unlike a dog, I want two cats"],
                                         ["go to the sea", "Unlike a city, I want a beach"]]
    assert llm["llm"] == [True, True] and set(llm["source"]) == {"generated"}

    # optimized_images.json -> {duplicate: kept name}, shipped with the benchmark's datasets
    expected_map = {"B002": "B001", "B009": "B004"}
    assert json.loads((tmp_path / "zoo" / "dedup_maps" / "fashioniq.json").read_text()) == expected_map
    assert json.loads((out / "spn4cir-fiq-scaled-triplets-clip" / "dedup_map.json").read_text()) == expected_map
    kinds = {e.path: e.kind for e in report.entries}
    assert kinds["fashionIQ_dataset/optimized_images.json"] == "dedup_map"
    assert kinds["mm_data/fiq/fashioniq_it_llava_5.json"] == "not_converted"


def test_ids_are_checked_against_the_benchmark(tmp_path):
    fiq = _fashioniq(tmp_path)
    corpus = datasets.load_dataset(str(fiq), "corpus", split="train")
    bad = tmp_path / "cap.extend_clip.train.json"
    bad.write_text(json.dumps(FIQ_EXTEND + [{"target": "B404", "candidate": "B000", "captions": ["x"]}]))
    with pytest.raises(AnnotationError, match=r"cap.extend_clip.train.json: record 2 target 'B404' is not in"):
        convert_extend_file(bad, tmp_path / "out", corpus)
    assert not (tmp_path / "out").exists()
    optimized = tmp_path / "optimized_images.json"
    optimized.write_text(json.dumps([["B000"], [""], {"B000": 0, "Z9": 0}]))
    with pytest.raises(AnnotationError, match="'Z9' is not in the benchmark"):
        read_dedup_map(optimized, corpus["image_id"])
    optimized.write_text(json.dumps([["B000"], [""], {"B001": 3}]))
    with pytest.raises(AnnotationError, match="'B001' maps to group 3"):
        read_dedup_map(optimized)


def test_extend_file_names_and_llm_variants():
    clip = parse_extend_name("captions/cap.extend_clip.train.json")
    clip_llm = parse_extend_name("captions/cap.extend_clip_llm.train.json")
    blip2 = parse_extend_name("cirr/captions/cap.rc2.train.extend_blip2.json")
    assert (clip.dataset, clip.backbone, clip.variants()) == ("fashioniq", "clip", [False])
    assert (clip_llm.backbone, clip_llm.variants()) == ("clip", [True])  # read only with --llmcap
    assert (blip2.dataset, blip2.backbone, blip2.variants()) == ("cirr", "blip2", [False, True])
    assert parse_extend_name("cap.dress.train.json") is None and parse_extend_name("cap.rc2.train.json") is None


# ------------------------------------------------------------------------------------------ models
def _check_zoo(tmp_path, checkpoints, expected_models, **kwargs):
    release = _release(tmp_path / "release", checkpoints)
    report = build_zoo(release, tmp_path / "zoo", tokenizers=_tokenizers(tmp_path), **kwargs)
    models = tmp_path / "zoo" / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted(expected_models)
    for name, (model_type, dataset, stage, *paper) in expected_models.items():
        model = AutoModel.from_pretrained(models / name)
        assert model.config.model_type == model_type
        assert AutoProcessor.from_pretrained(models / name).tokenizer is not None
        card = ModelCard.load(models / name / "README.md")
        assert card.data.model_name == name and f"stage-{stage}" in card.data.tags
        reported = {r.metric_type: r.metric_value for r in card.data.eval_results if "(reported)" in r.metric_name}
        # the paper's numbers only on a checkpoint of the paper's backbone
        assert reported == (reported_metrics(model_type, dataset, stage) if paper != [False] else {})
        assert all(r.verified is False and "not re-measured" in r.source_name for r in card.data.eval_results
                   if "(reported)" in r.metric_name)
        text = (models / name / "README.md").read_text()
        source = next(e for e in report.of("model") if e.outputs == [f"models/{name}"]).path
        assert f"`{source}`, sha256 `" in text and "evaluation protocol" in text
        # the release card's license, the Hub's pipeline tag, and one usage snippet, loading this model
        assert (card.data.license, card.data.pipeline_tag) == ("mit", "image-feature-extraction")
        namespace = kwargs.get("namespace")
        assert text.count("```python") == 1 and f'model="{f"{namespace}/" if namespace else ""}{name}"' in text
    return report


def test_every_family_converts_loads_and_has_a_card(tmp_path):
    report = _check_zoo(tmp_path, ALL_FAMILIES, {
        "spn4cir-clip4cir-fiq-stage1": ("clip4cir", "fashioniq", 1),
        "spn4cir-clip4cir-fiq": ("clip4cir", "fashioniq", 2),
        f"{VIT_CLIP4CIR}-cirr": ("clip4cir", "cirr", 2, False),  # checkpoints/cirr_clip/weights is a ViT
        "spn4cir-tgcir-cirr-stage1": ("tgcir", "cirr", 1),
        "spn4cir-tgcir-cirr": ("tgcir", "cirr", 2),
        "spn4cir-blip4cir-fiq-stage1": ("blip4cir", "fashioniq", 1),
        "spn4cir-blip4cir-fiq": ("blip4cir", "fashioniq", 2),
        "spn4cir-sprc-cirr-stage1": ("sprc", "cirr", 1),
        "spn4cir-sprc-cirr": ("sprc", "cirr", 2),
    })
    cards = {name: _eval_results(tmp_path / "zoo" / "models" / name) for name in ("spn4cir-sprc-cirr",
                                                                                  "spn4cir-tgcir-cirr-stage1")}
    assert cards["spn4cir-sprc-cirr"][("average", "(reported)", "test")] == 82.69  # CIRR: the test server's numbers
    assert cards["spn4cir-tgcir-cirr-stage1"][("recall@1", "(reported)", "test")] == 45.23
    # the paper's CIRR tau for TG-CIR reaches the config
    assert AutoConfig.from_pretrained(tmp_path / "zoo" / "models" / "spn4cir-tgcir-cirr").temperature == 0.01
    assert len(report.of("model")) == 9


def test_unknown_files_are_reported_and_the_converted_model_matches_the_original(tmp_path):
    # a TG-CIR checkpoint with a weight missing: recognized, its conversion fails, the rest of the zoo converts
    broken = torch.load(FIXTURES / "parity_tgcir" / "spn4cir_tgcir_stage2.pt", weights_only=True)
    del broken["state_dict"]["backbone.clip.visual.proj"]
    (tmp_path / "release" / "checkpoints" / "fiq_tgcir").mkdir(parents=True)
    torch.save(broken, tmp_path / "release" / "checkpoints" / "fiq_tgcir" / "best.pt")
    report = _check_zoo(tmp_path, CLIP_ONLY, {
        "spn4cir-clip4cir-fiq-stage1": ("clip4cir", "fashioniq", 1),
        "spn4cir-clip4cir-fiq": ("clip4cir", "fashioniq", 2),
        f"{VIT_CLIP4CIR}-cirr": ("clip4cir", "cirr", 2, False),
    })
    saved = json.loads((tmp_path / "zoo" / "conversion_report.json").read_text())
    unrecognized = {e["path"]: e["reason"] for e in saved["unrecognized"]}
    assert list(unrecognized) == ["notes/todo.bin"] and "neither a checkpoint" in unrecognized["notes/todo.bin"]
    not_converted = {e["path"]: e["reason"] for e in saved["not_converted"]}
    assert "Combiner" in not_converted["data/clip4cir/combiner.pt"]
    assert "conversion failed" in not_converted["checkpoints/fiq_tgcir/best.pt"]
    assert "backbone.clip.visual.proj" in not_converted["checkpoints/fiq_tgcir/best.pt"]
    assert "benchmark is needed" in not_converted["fashionIQ_dataset/captions/cap.extend_clip.train.json"]
    assert "captions" in not_converted["mm_data/fiq/fashioniq_it_llava_5.json"]
    every_file = {p.relative_to(tmp_path / "release").as_posix() for p in (tmp_path / "release").rglob("*")
                  if p.is_file()}
    assert {e.path for e in report.entries} == every_file  # nothing skipped silently

    # the stage-2 model behaves as the original code computed (parity fixture)
    inputs = load_file(FIXTURES / "parity_clip4cir" / "inputs.safetensors")
    expected = load_file(FIXTURES / "parity_clip4cir" / "expected.safetensors")
    model = AutoModel.from_pretrained(tmp_path / "zoo" / "models" / "spn4cir-clip4cir-fiq").eval()
    with torch.no_grad():
        target = model.get_target_embeds(inputs["target_pixel_values"])
    torch.testing.assert_close(target, expected["rn.target_embeds"], atol=1e-4, rtol=1e-4)


def test_data_dir_adds_measured_metrics_and_push_to_hub_publishes(tmp_path, monkeypatch):
    from convert_paper_checkpoints import main

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, repo_type))

        def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, ignore_patterns=None):
            files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
            ignored = tuple(p.strip("*") for p in ignore_patterns or ())
            calls.append(("upload_folder", repo_id, repo_type,
                          [f for f in files if not (ignored and f.startswith(ignored))]))

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    release = _release(tmp_path / "release", {k: v for k, v in CLIP_ONLY.items() if "fiq" in k})
    data = tmp_path / "project"
    data.mkdir()
    shutil.copytree(_fashioniq(tmp_path), data / "fashionIQ_dataset")  # SPN4CIR's project layout
    tok = _tokenizers(tmp_path)["clip4cir"]
    downloads = []
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, revision=None: downloads.append(repo_id) or str(release))
    main(["--output_dir", str(tmp_path / "zoo"), "--data_dir", str(data),
          "--tokenizer", f"clip4cir={tok}", "--push_to_hub", "--namespace", "me"])

    assert downloads == ["BUAADreamer/SPN4CIR"]  # the release is downloaded when no --local_dir is given
    results = _eval_results(tmp_path / "zoo" / "models" / "spn4cir-clip4cir-fiq")
    assert results[("average", "(reported)", "val")] == 55.68
    measured = {k[0]: v for k, v in results.items() if k[1] == "(measured)"}
    assert set(measured) >= {"dress_recall@10", "dress_recall@50", "average_recall@10", "average"}
    assert all(0.0 <= v <= 100.0 for v in measured.values())

    assert [c[:3] for c in calls] == [
        ("create_repo", "me/spn4cir-clip4cir-fiq", "model"), ("upload_folder", "me/spn4cir-clip4cir-fiq", "model"),
        ("create_repo", "me/spn4cir-clip4cir-fiq-stage1", "model"),
        ("upload_folder", "me/spn4cir-clip4cir-fiq-stage1", "model"),
        ("create_repo", "me/spn4cir-fiq-scaled-triplets-clip", "dataset"),
        ("upload_folder", "me/spn4cir-fiq-scaled-triplets-clip", "dataset"),
        ("create_repo", "me/spn4cir-fiq-scaled-triplets-clip-llm", "dataset"),
        ("upload_folder", "me/spn4cir-fiq-scaled-triplets-clip-llm", "dataset"),
    ]
    model_files = calls[1][3]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(model_files)
    assert not any(f.startswith(".") for f in model_files)
    dataset_files = calls[5][3]
    assert "README.md" in dataset_files and "dedup_map.json" in dataset_files
    assert any(f.startswith("triplets/") and f.endswith(".parquet") for f in dataset_files)
    assert ModelCard.load(tmp_path / "zoo" / "models" / "spn4cir-clip4cir-fiq" / "README.md").data.base_model == \
        "me/spn4cir-clip4cir-fiq-stage1"


def test_checkpoints_are_named_by_their_content_not_their_path(tmp_path):
    """A ViT CLIP4CIR under fiq_blip/ is named for what it is (no paper numbers on its card); the genuine
    fiq_clip/best.pt keeps the paper's name and numbers; a byte copy is reported, a checkpoint of the same identity
    with other weights is converted too (both named by their sha256); the output may not sit in the release."""
    different = torch.load(FIXTURES / "parity_clip4cir" / "spn4cir_clip4cir_rn_stage2.pt", weights_only=True)
    different["state_dict"]["clip.text_projection"] = different["state_dict"]["clip.text_projection"] + 0.01
    release = _release(tmp_path / "release", {
        "checkpoints/fiq_blip/best.pt": "parity_clip4cir/spn4cir_clip4cir_vit_stage2.pt",  # sorts before fiq_clip/
        "checkpoints/fiq_clip/best.pt": "parity_clip4cir/spn4cir_clip4cir_rn_stage2.pt",
        "checkpoints/fiq_clip/copy.pt": "parity_clip4cir/spn4cir_clip4cir_rn_stage2.pt",
        "checkpoints/cirr_clip/best.pt": "parity_clip4cir/spn4cir_clip4cir_rn_stage2.pt"})
    torch.save(different, release / "checkpoints" / "cirr_clip" / "retrained.pt")
    report = build_zoo(release, tmp_path / "zoo", tokenizers=_tokenizers(tmp_path))
    outputs = {e.path: e.outputs for e in report.of("model")}
    sha = {e.path: e.details["sha256"][:8] for e in report.of("model")}
    assert outputs == {"checkpoints/fiq_blip/best.pt": [f"models/{VIT_CLIP4CIR}-fiq"],
                       "checkpoints/fiq_clip/best.pt": ["models/spn4cir-clip4cir-fiq"],
                       "checkpoints/cirr_clip/best.pt": [f"models/spn4cir-clip4cir-cirr-{sha['checkpoints/cirr_clip/best.pt']}"],
                       "checkpoints/cirr_clip/retrained.pt":
                           [f"models/spn4cir-clip4cir-cirr-{sha['checkpoints/cirr_clip/retrained.pt']}"]}
    copy = next(e for e in report.entries if e.path == "checkpoints/fiq_clip/copy.pt")
    assert copy.kind == "not_converted" and "byte-for-byte copy of checkpoints/fiq_clip/best.pt" in copy.reason
    backbones = {e.path: e.details["backbone"] for e in report.of("model")}
    assert backbones["checkpoints/fiq_blip/best.pt"] == "ViT-w64-l2/16 64px"  # from its weights, not its folder
    models = tmp_path / "zoo" / "models"
    assert not any("(reported)" in key[1] for key in _eval_results(models / f"{VIT_CLIP4CIR}-fiq"))
    assert "the paper reports CLIP4CIR with OpenAI CLIP RN50x4" in (models / f"{VIT_CLIP4CIR}-fiq" / "README.md").read_text()
    assert _eval_results(models / "spn4cir-clip4cir-fiq")[("average", "(reported)", "val")] == 55.68

    with pytest.raises(OutputDirError, match=r"is or is inside the release copy"):
        build_zoo(release, release / "zoo", tokenizers=_tokenizers(tmp_path))  # its outputs would be release files
    with pytest.raises(OutputDirError, match=r"is or is inside the release copy"):
        build_zoo(release, release, tokenizers=_tokenizers(tmp_path))


def test_the_papers_backbones_are_what_the_converters_name_the_released_geometries(monkeypatch):
    """RN50x4 (288 px), CLIP ViT-B/16, BLIP base's ViT-B/16 at 384 px, BLIP-2's EVA ViT-g/14 (39 blocks): shape-only
    state dicts of the released towers get each family's `PaperFacts.backbone_label`."""
    import importlib

    monkeypatch.undo()  # the real paper facts
    from modeling_spn4cir.families import family

    meta = lambda *shape: torch.empty(shape, device="meta")

    def resnet(layers, width, size, prefix=""):
        state = {f"{prefix}visual.layer{b}.{i}.conv1.weight": meta(width, 1, 1, 1)
                 for b, n in enumerate(layers, 1) for i in range(n)}
        return state | {f"{prefix}visual.attnpool.positional_embedding": meta((size // 32) ** 2 + 1, 8)}

    def clip_vit(width, layers, patch, size, prefix=""):
        state = {f"{prefix}visual.transformer.resblocks.{i}.mlp.c_fc.weight": meta(4 * width, width)
                 for i in range(layers)}
        return state | {f"{prefix}visual.proj": meta(width, 512), f"{prefix}visual.conv1.weight": meta(width, 3, patch, patch),
                        f"{prefix}visual.positional_embedding": meta((size // patch) ** 2 + 1, width),
                        f"{prefix}text_projection": meta(512, 512)}

    def timm_vit(width, layers, patch, size):
        return {f"visual_encoder.blocks.{i}.mlp.fc1.weight": meta(4, 4) for i in range(layers)} | {
            "visual_encoder.cls_token": meta(1, 1, width), "visual_encoder.pos_embed": meta(1, (size // patch) ** 2 + 1, width),
            "visual_encoder.patch_embed.proj.weight": meta(width, 3, patch, patch)}

    released = {"clip4cir": resnet((4, 6, 10, 6), 80, 288), "tgcir": clip_vit(768, 12, 16, 224, "backbone.clip."),
                "blip4cir": timm_vit(768, 12, 16, 384), "sprc": timm_vit(1408, 39, 14, 224)}
    for name, state in released.items():
        converter = importlib.import_module(f"modeling_spn4cir.{name}.convert_{name}_original_checkpoint")
        assert converter.backbone(converter.OriginalCheckpoint(state, "spn4cir_stage2")) == \
            family(name).paper.backbone_label, name
