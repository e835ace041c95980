"""Using a trained model: the gallery index, the "composed-image-retrieval" pipeline, the retrieve CLI, the
evaluation's retrieval report and the demo's query function."""

import base64
import io
import json
from html.parser import HTMLParser

import datasets
import pytest
import torch
from conftest import run_without_package, solid_images, tiny_model, tiny_tokenizer

import modeling_spn4cir  # noqa: F401  (registers the pipeline task)
from datasets_scripts.gallery_index import CIRIndex, ModelMismatchError, model_fingerprint
from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRModel, CLIP4CIRProcessor
from modeling_spn4cir.cir_contract import max_token_similarity

TEXTS = ["make it blue", "red circle", "and more"]


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "gallery"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(solid_images(12, size=40, seed=3)):
        image.save(folder / ("sub" if i % 4 == 0 else "") / f"im{i:02d}.png")
    return folder


@pytest.fixture
def saved(tiny_model_dir):
    model = CLIP4CIRModel.from_pretrained(tiny_model_dir).eval()
    processor = CLIP4CIRProcessor.from_pretrained(tiny_model_dir)
    return tiny_model_dir, model, processor


def _pipe(model, processor):
    from transformers import pipeline

    return pipeline("composed-image-retrieval", model=model, processor=processor, device=-1)


def _brute_force(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Sorted by score, ties by lower index — written independently of rank_topk."""
    return [sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k] for row in scores]


# ------------------------------------------------------------------------------------------------ index
def test_index_round_trip_and_add_equal_a_fresh_index(saved, image_dir, tmp_path):
    _, model, processor = saved
    fresh = CIRIndex.build(model, processor.image_processor, image_dir, batch_size=5, show_progress_bar=False)
    assert len(fresh) == 12 and "sub/im00.png" in fresh.image_ids
    files = sorted(p for p in image_dir.rglob("*.png"))
    first = CIRIndex.build(model, processor.image_processor, files[:7], ids=[f.relative_to(image_dir).as_posix()
                                                                              for f in files[:7]],
                           show_progress_bar=False)
    first.save(tmp_path / "idx")
    grown = CIRIndex.load(tmp_path / "idx").add(model, processor.image_processor, files[7:],
                                                ids=[f.relative_to(image_dir).as_posix() for f in files[7:]],
                                                show_progress_bar=False)
    grown.save(tmp_path / "idx", overwrite=True)
    loaded = CIRIndex.load(tmp_path / "idx")
    order = [loaded.image_ids.index(i) for i in fresh.image_ids]
    torch.testing.assert_close(loaded.embeddings[order], fresh.embeddings, rtol=0, atol=1e-6)
    assert [loaded.paths[i] for i in order] == fresh.paths
    assert loaded.fingerprint == fresh.fingerprint
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(model, processor.image_processor, files[:1], ids=[fresh.image_ids[0]], show_progress_bar=False)


def test_index_topk_equals_brute_force_with_exclusion_and_multivector():
    torch.manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(300, 8), dim=-1)
    gallery[17] = gallery[5]  # an exact tie: the lower index must rank first
    queries = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    queries[0] = gallery[5]
    index = CIRIndex(gallery, [f"g{i}" for i in range(300)], [None] * 300, {"digest": "x"})
    indices, scores = index.topk(queries, 10)
    full = queries @ gallery.T
    assert indices.tolist() == _brute_force(full, 10)
    torch.testing.assert_close(scores, full.gather(1, indices))
    assert indices[0, :2].tolist() == [5, 17]
    # Per-query exclusion, some queries excluding nothing.
    exclude = ["g5", None, "g9", None, None, None, "g0"]
    got, _ = index.topk(queries, 10, exclude=exclude)
    masked = full.clone()
    for row, e in enumerate(exclude):
        if e is not None:
            masked[row, int(e[1:])] = float("-inf")
    assert got.tolist() == _brute_force(masked, 10)
    # Multi-vector targets [N, Q, D] ranked by max over tokens (SPRC).
    tokens = torch.nn.functional.normalize(torch.randn(50, 4, 8), dim=-1)
    multi = CIRIndex(tokens, [str(i) for i in range(50)], [None] * 50, {"digest": "x"})
    with pytest.raises(ValueError, match="similarity=model.similarity"):
        multi.topk(queries, 5)
    got, _ = multi.topk(queries, 5, similarity=max_token_similarity)
    assert got.tolist() == _brute_force(max_token_similarity(queries, tokens), 5)


def test_model_mismatch_is_refused_naming_both_and_stage2_keeps_the_index(saved, image_dir):
    _, model, processor = saved
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    other = tiny_model(seed=1)
    with pytest.raises(ModelMismatchError) as error:
        index.check_model(other, processor.image_processor)
    mine, theirs = index.fingerprint, model_fingerprint(other, processor.image_processor)
    message = str(error.value)
    assert mine["target_side_weights"][:12] in message and theirs["target_side_weights"][:12] in message
    with pytest.raises(ModelMismatchError):
        _pipe(other, processor)(None, "red circle", gallery=index)
    # Another image preprocessing is another model too.
    with pytest.raises(ModelMismatchError, match="image processor"):
        index.check_model(model, CLIP4CIRImageProcessor(size=32, preprocessing="resize"))
    # Stage 2 trains only the query side: the index built by the stage-1 model stays valid.
    stage2 = CLIP4CIRModel.from_pretrained(mine["model"]).eval()
    with torch.no_grad():
        for p in stage2.query_side_parameters():
            p.add_(0.1)
    index.check_model(stage2, processor.image_processor)


# --------------------------------------------------------------------------------------------- pipeline
def test_pipeline_ranks_as_model_similarity(saved, image_dir):
    model_dir, model, processor = saved
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    from transformers import pipeline

    pipe = pipeline("composed-image-retrieval", model=str(model_dir), device=-1)
    references = [image_dir / "im01.png", image_dir / "sub" / "im04.png"]
    texts = ["make it blue", "red circle"]
    got = pipe([str(r) for r in references], texts, gallery=index, top_k=5, batch_size=2)

    from PIL import Image

    with torch.no_grad():
        batch = processor(images=[Image.open(r).convert("RGB") for r in references], text=texts)
        queries = model.get_query_embeds(batch["input_ids"], batch["attention_mask"],
                                         pixel_values=batch["pixel_values"])
        pixels = processor.image_processor([index.open_image(i) for i in index.image_ids])["pixel_values"]
        scores = model.similarity(queries, model.get_target_embeds(pixels))
    expected = _brute_force(scores, 5)
    assert [[h["image_id"] for h in hits] for hits in got] == [[index.image_ids[j] for j in row] for row in expected]
    for hits, row, srow in zip(got, expected, scores):
        assert [h["score"] for h in hits] == pytest.approx([float(srow[j]) for j in row], abs=1e-5)
        assert all(h["path"] and h["path"].endswith(h["image_id"].split("/")[-1]) for h in hits)
    # One query at a time gives the same ranking as the batch (scores up to batched float rounding).
    single = pipe(str(references[1]), texts[1], gallery=index, top_k=5)
    assert [h["image_id"] for h in single] == [h["image_id"] for h in got[1]]
    assert [h["score"] for h in single] == pytest.approx([h["score"] for h in got[1]], abs=1e-6)

    # Text-only (sum fusion: the normalized text feature) and image-only (the reference's target embedding).
    with torch.no_grad():
        text_query = torch.nn.functional.normalize(model.get_text_features(batch["input_ids"][:1],
                                                                           batch["attention_mask"][:1]), dim=-1)
        image_query = model.get_target_embeds(batch["pixel_values"][1:])
    mixed = pipe([None, str(references[1])], ["make it blue", None], gallery=index, top_k=4, batch_size=2)
    gallery = model.get_target_embeds(pixels).detach()
    for hits, query in zip(mixed, (text_query, image_query)):
        assert [h["image_id"] for h in hits] == [index.image_ids[j] for j in _brute_force(query @ gallery.T, 4)[0]]
    assert mixed[1][0]["image_id"] == "sub/im04.png"


@pytest.mark.slow
def test_pipeline_ships_with_the_model_for_trust_remote_code(saved, image_dir, tmp_path):
    _, model, processor = saved
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    pipe = _pipe(model, processor)
    expected = [h["image_id"] for h in pipe(str(image_dir / "im02.png"), "and more", gallery=index, top_k=4)]
    shipped = tmp_path / "shipped"
    pipe.save_pretrained(shipped)
    assert json.loads((shipped / "config.json").read_text())["custom_pipelines"]["composed-image-retrieval"]["impl"] \
        == "pipeline_cir.ComposedImageRetrievalPipeline"
    torch.save({"embeddings": index.embeddings, "ids": index.image_ids}, tmp_path / "gallery.pt")
    out = run_without_package(f"""
        import json, torch
        from transformers import pipeline
        data = torch.load({str(tmp_path / 'gallery.pt')!r})
        class Gallery:  # the three methods of CIRIndex the pipeline calls
            def check_model(self, model, image_processor): pass
            def topk(self, queries, k, similarity=None, backend="exact"):
                scores = similarity(queries, data["embeddings"])
                return scores.topk(k).indices, scores.topk(k).values
            def hits(self, indices, scores):
                return [[{{"image_id": data["ids"][i], "score": float(s), "path": None}}
                         for i, s in zip(r.tolist(), q.tolist())] for r, q in zip(indices, scores)]
        pipe = pipeline(model={str(shipped)!r}, trust_remote_code=True, device=-1)
        print(type(pipe).__module__)
        print(json.dumps([h["image_id"] for h in pipe({str(image_dir / 'im02.png')!r}, "and more", gallery=Gallery(),
                                                      top_k=4)]))
    """, tmp_path)
    module, ids = out.strip().splitlines()[-2:]
    assert "transformers_modules" in module  # the shipped code, not this package
    assert json.loads(ids) == expected


# ------------------------------------------------------------------------------------------------- CLI
def test_retrieve_cli_end_to_end(tiny_model_dir, image_dir, tmp_path):
    import retrieve

    retrieve.main(["index", "--model", str(tiny_model_dir), "--images", str(image_dir), "--output",
                   str(tmp_path / "idx"), "--batch_size", "5"])
    hits = retrieve.main(["search", "--index", str(tmp_path / "idx"), "--reference", str(image_dir / "im03.png"),
                          "--text", "make it blue", "--top_k", "4", "--json", str(tmp_path / "hits.json"),
                          "--html", str(tmp_path / "hits.html")])
    written = json.loads((tmp_path / "hits.json").read_text())
    assert written["results"] == hits and len(hits) == 4
    model = CLIP4CIRModel.from_pretrained(tiny_model_dir).eval()
    processor = CLIP4CIRProcessor.from_pretrained(tiny_model_dir)
    index = CIRIndex.load(tmp_path / "idx")
    assert hits == _pipe(model, processor)(str(image_dir / "im03.png"), "make it blue", gallery=index, top_k=4)
    page = _Page.parse((tmp_path / "hits.html").read_text())
    assert [f["data-image-id"] for f in page.sections[0]["hits"]] == [h["image_id"] for h in hits]
    assert all(_decodes(src) for src in page.sections[0]["images"])


# ---------------------------------------------------------------------------------------------- report
class _Page(HTMLParser):
    """Sections (queries) with their hit figures, targets and image sources."""

    def __init__(self):
        super().__init__()
        self.sections = []

    @classmethod
    def parse(cls, text):
        page = cls()
        page.feed(text)
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "query" in classes:
            self.sections.append({"hits": [], "targets": [], "images": [], "rank": attrs.get("data-target-rank")})
        elif tag == "figure" and self.sections:
            if "hit" in classes:
                self.sections[-1]["hits"].append(attrs)
            if "target" in classes:
                self.sections[-1]["targets"].append(attrs)
        elif tag == "img" and self.sections:
            self.sections[-1]["images"].append(attrs["src"])


def _decodes(src: str) -> bool:
    from PIL import Image

    assert src.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size[0] > 0


def test_evaluator_report_shows_queries_hits_and_marks_targets(tmp_path):
    from PIL import Image

    from trainers.evaluation import CIREvaluator

    model = tiny_model().eval()
    ids = [f"img{i}" for i in range(10)]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(10)}, features=datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image()}))
    triplets = datasets.Dataset.from_dict({"reference_id": [f"img{i}" for i in range(5)],
                                           "target_id": [f"img{(i + 3) % 10}" for i in range(5)],
                                           "modification_texts": [[TEXTS[i % 3]] for i in range(5)]})
    tokenizer = tiny_tokenizer(TEXTS)
    evaluator = CIREvaluator(corpus, triplets, CLIP4CIRImageProcessor(size=32), tokenizer, protocol="recall",
                             show_progress_bar=False, report_dir=str(tmp_path / "report"), report_queries=3,
                             report_top_k=4)
    metrics = evaluator(model)
    page = _Page.parse((tmp_path / "report" / "retrieval_report.html").read_text())
    assert len(page.sections) == 3
    # Queries 0, 2, 4 (spread evenly): recompute their full rankings with the reference removed.
    processor = CLIP4CIRImageProcessor(size=32)
    with torch.no_grad():
        pixels = processor(list(corpus["image"]))["pixel_values"]
        gallery, features = model.get_target_embeds_and_reference_features(pixels)
        tokens = tokenizer([TEXTS[i % 3] for i in (0, 2, 4)], padding=True, return_tensors="pt")
        queries = model.get_query_embeds(tokens["input_ids"], tokens["attention_mask"],
                                         reference_features=features[[0, 2, 4]])
        scores = model.similarity(queries, gallery)
    ranks = []
    for section, row, q in zip(page.sections, scores, (0, 2, 4)):
        row = row.clone()
        row[q] = float("-inf")
        order = _brute_force(row[None], 10)[0]
        assert [f["data-image-id"] for f in section["hits"]] == [ids[j] for j in order[:4]]
        target = (q + 3) % 10
        ranks.append(order.index(target) + 1)
        assert int(section["rank"]) == ranks[-1]
        assert [t["data-image-id"] for t in section["targets"]] == [ids[target]]  # marked in or after the top 4
        assert all(_decodes(src) for src in section["images"]) and len(section["images"]) == 4 + 1 + (ranks[-1] > 4)
    assert metrics["recall@1"] >= 0
    sheet = Image.open(tmp_path / "report" / "retrieval_report.png")
    assert sheet.height > 3 * 96 and sheet.width > 4 * 96


# ------------------------------------------------------------------------------------------------ demo
def test_demo_query_returns_the_pipeline_results(saved, image_dir):
    import demo

    _, model, processor = saved
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    pipe = _pipe(model, processor)
    app = demo.RetrievalDemo(pipe, index)
    from PIL import Image

    reference = Image.open(image_dir / "im05.png").convert("RGB")
    expected = pipe(reference, "red circle", gallery=index, top_k=6)
    items, hits = app.run(reference, "red circle", 6)
    assert hits == expected
    assert [caption.split()[-1] for _, caption in items] == [h["image_id"] for h in expected]
    assert items[0][0].size == Image.open(expected[0]["path"]).size
    assert app.run(None, "", 6)[0] == []


def test_faiss_backend_recall_against_exact():
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    centres = torch.randn(40, 32)
    gallery = torch.nn.functional.normalize(centres[torch.randint(0, 40, (4000,))] + 0.5 * torch.randn(4000, 32),
                                            dim=-1)
    queries = torch.nn.functional.normalize(centres[torch.randint(0, 40, (50,))] + 0.5 * torch.randn(50, 32), dim=-1)
    index = CIRIndex(gallery, [str(i) for i in range(4000)], [None] * 4000, {"digest": "x"})
    exact, _ = index.topk(queries, 10)
    approx, scores = index.topk(queries, 10, backend="faiss")
    recall = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist())) / exact.numel()
    assert recall >= 0.95
    torch.testing.assert_close(scores, (queries @ gallery.T).gather(1, approx), atol=1e-5, rtol=0)
    excluded, _ = index.topk(queries, 10, backend="faiss", exclude=[str(i) for i in exact[:, 0].tolist()])
    assert not (excluded == exact[:, :1]).any() and excluded.shape == (50, 10)
