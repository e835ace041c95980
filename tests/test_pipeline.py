"""Using a trained model: the "composed-image-retrieval" pipeline (composed, text-only and image-only queries
through the model contract; shippable with `trust_remote_code`), the retrieve CLI and the demo's query function."""

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import brute_force_topk, retrieval_pipeline, run_without_package
from test_report import _decodes, _Page

from modeling_spn4cir import CLIP4CIRModel, CLIP4CIRProcessor
from modeling_spn4cir.retrieval import CIRIndex

ROOM = Path(__file__).resolve().parents[1] / "modeling_spn4cir" / "retrieval"


def test_pipeline_ranks_as_model_similarity(saved_tiny_model, image_dir):
    model_dir, model, processor = saved_tiny_model
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
    expected = brute_force_topk(scores, 5)
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
        assert [h["image_id"] for h in hits] == [index.image_ids[j] for j in brute_force_topk(query @ gallery.T, 4)[0]]
    assert mixed[1][0]["image_id"] == "sub/im04.png"


@pytest.mark.slow
def test_pipeline_ships_with_the_model_for_trust_remote_code(saved_tiny_model, image_dir, tmp_path):
    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    pipe = retrieval_pipeline(model, processor)
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
    assert hits == retrieval_pipeline(model, processor)(str(image_dir / "im03.png"), "make it blue", gallery=index,
                                                        top_k=4)
    assert not (tmp_path / "idx.partial").exists()  # the build's shards are removed once the index is written
    page = _Page.parse((tmp_path / "hits.html").read_text())
    assert [f["data-image-id"] for f in page.sections[0]["hits"]] == [h["image_id"] for h in hits]
    assert all(_decodes(src) for src in page.sections[0]["images"])


# ------------------------------------------------------------------------------------------------ demo
def test_demo_query_returns_the_pipeline_results(saved_tiny_model, image_dir):
    import demo

    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    pipe = retrieval_pipeline(model, processor)
    app = demo.RetrievalDemo(pipe, index)
    from PIL import Image

    reference = Image.open(image_dir / "im05.png").convert("RGB")
    expected = pipe(reference, "red circle", gallery=index, top_k=6)
    items, hits = app.run(reference, "red circle", 6)
    assert hits == expected
    assert [caption.split()[-1] for _, caption in items] == [h["image_id"] for h in expected]
    assert items[0][0].size == Image.open(expected[0]["path"]).size
    assert app.run(None, "", 6)[0] == []


def test_the_room_asks_the_model_contract_not_family_internals():
    """Retrieval encodes queries and targets through the contract (`get_query_embeds`, `get_text_query_embeds`,
    `get_image_query_embeds`, `get_target_embeds`, `similarity`), so it names no family's modules or options."""
    internals = ("fusion", "combine", "projection_dim", "qformer")
    found = []
    for path in sorted(ROOM.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            words = [getattr(node, attr, None) for attr in ("id", "attr", "name", "arg")]
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words.append(node.value)
            found += [f"{path.name}: {w}" for w in words
                      if isinstance(w, str) and any(i in w.lower() for i in internals)]
    assert not found, found
    pipeline_source = (ROOM / "pipeline_cir.py").read_text()
    assert all(f"self.model.{method}(" in pipeline_source
               for method in ("get_query_embeds", "get_text_query_embeds", "get_image_query_embeds"))
    # Shipped for `trust_remote_code`: no import of this package, relative or absolute.
    tree = ast.parse(pipeline_source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] if n.level == 0 else "."
                 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "torch", "transformers", "PIL"}, imported
