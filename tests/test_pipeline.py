"""Using a trained model: the "composed-image-retrieval" pipeline (composed, text-only and image-only queries
through the model contract; shippable with `trust_remote_code`), the retrieve CLI and the demo's query function."""

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    brute_force_topk,
    retrieval_pipeline,
    run_without_package,
    solid_images,
)
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
    # The references are gallery images: each is left out of its own ranking (as the protocols do) ...
    own = [index.image_ids.index("im01.png"), index.image_ids.index("sub/im04.png")]
    without_own = scores.clone()
    without_own[[0, 1], own] = float("-inf")
    expected = brute_force_topk(without_own, 5)
    assert [[h["image_id"] for h in hits] for hits in got] == [[index.image_ids[j] for j in row] for row in expected]
    for hits, row, srow in zip(got, expected, scores):
        assert [h["score"] for h in hits] == pytest.approx([float(srow[j]) for j in row], abs=1e-5)
        assert all(h["path"] and h["path"].endswith(h["image_id"].split("/")[-1]) for h in hits)
    # ... unless kept.
    kept = pipe([str(r) for r in references], texts, gallery=index, top_k=5, batch_size=2, keep_reference=True)
    assert [[h["image_id"] for h in hits] for hits in kept] == [[index.image_ids[j] for j in row]
                                                                for row in brute_force_topk(scores, 5)]
    # One query at a time gives the same ranking as the batch (scores up to batched float rounding).
    single = pipe(str(references[1]), texts[1], gallery=index, top_k=5)
    assert [h["image_id"] for h in single] == [h["image_id"] for h in got[1]]
    assert [h["score"] for h in single] == pytest.approx([h["score"] for h in got[1]], abs=1e-6)

    # Text-only (sum fusion: the normalized text feature) and image-only (the reference's target embedding).
    with torch.no_grad():
        text_query = torch.nn.functional.normalize(model.get_text_features(batch["input_ids"][:1],
                                                                           batch["attention_mask"][:1]), dim=-1)
        image_query = model.get_target_embeds(batch["pixel_values"][1:])
    mixed = pipe([None, str(references[1])], ["make it blue", None], gallery=index, top_k=4, batch_size=2,
                 keep_reference=True)
    gallery = model.get_target_embeds(pixels).detach()
    for hits, query in zip(mixed, (text_query, image_query)):
        assert [h["image_id"] for h in hits] == [index.image_ids[j] for j in brute_force_topk(query @ gallery.T, 4)[0]]
    assert mixed[1][0]["image_id"] == "sub/im04.png" and mixed[1][0]["score"] == pytest.approx(1.0, abs=1e-5)
    image_only = pipe(str(references[1]), gallery=index, top_k=4)
    assert [h["image_id"] for h in image_only] == [h["image_id"] for h in pipe(
        str(references[1]), gallery=index, top_k=5, keep_reference=True)[1:]]


def test_a_reference_in_the_gallery_is_left_out_by_id_or_by_content(saved_tiny_model, image_dir):
    from PIL import Image

    _, model, processor = saved_tiny_model
    pipe = retrieval_pipeline(model, processor)

    def ids(hits):
        return [h["image_id"] for h in hits]

    for dtype in (torch.float32, torch.float16):
        index = CIRIndex.build(model, processor.image_processor, image_dir, dtype=dtype, show_progress_bar=False)
        n = len(index)
        by_id = pipe(reference_id="im03.png", text="make it blue", gallery=index, top_k=n)
        assert len(by_id) == n - 1 and "im03.png" not in ids(by_id)
        upload = Image.open(image_dir / "im03.png").convert("RGB")  # decoded pixels, as an upload arrives
        assert ids(pipe(upload, "make it blue", gallery=index, top_k=n)) == ids(by_id)
        kept = pipe(reference_id="im03.png", text="make it blue", gallery=index, top_k=n, keep_reference=True)
        assert len(kept) == n and [i for i in ids(kept) if i != "im03.png"] == ids(by_id)
    # An image that is not in the gallery leaves nothing out.
    other = solid_images(1, size=40, seed=99)[0]
    assert pipe(other, "make it blue", gallery=index, top_k=n) == pipe(other, "make it blue", gallery=index,
                                                                        top_k=n, keep_reference=True)
    # Batched queries by gallery id, each leaving out its own reference.
    batch = pipe(reference_id=["im03.png", "sub/im04.png"], text=["make it blue", "red circle"], gallery=index,
                 top_k=3, batch_size=2)
    single = pipe(reference_id="sub/im04.png", text="red circle", gallery=index, top_k=3)
    assert ids(batch[1]) == ids(single) and "sub/im04.png" not in ids(batch[1]) and "im03.png" not in ids(batch[0])
    with pytest.raises(KeyError, match="nope.png"):
        pipe(reference_id="nope.png", text="red circle", gallery=index)
    with pytest.raises(ValueError, match="not both"):
        pipe(upload, reference_id="im03.png", gallery=index)


@pytest.mark.slow
def test_pipeline_ships_with_the_model_for_trust_remote_code(saved_tiny_model, image_dir, tmp_path):
    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    pipe = retrieval_pipeline(model, processor)
    expected = [h["image_id"] for h in pipe(str(image_dir / "im02.png"), "and more", gallery=index, top_k=4,
                                            keep_reference=True)]
    shipped = tmp_path / "shipped"
    pipe.save_pretrained(shipped)
    assert json.loads((shipped / "config.json").read_text())["custom_pipelines"]["composed-image-retrieval"]["impl"] \
        == "pipeline_cir.ComposedImageRetrievalPipeline"
    torch.save({"embeddings": index.embeddings, "ids": index.image_ids}, tmp_path / "gallery.pt")
    out = run_without_package(f"""
        import json, torch
        from transformers import pipeline
        data = torch.load({str(tmp_path / 'gallery.pt')!r})
        class Gallery:  # the methods of CIRIndex the pipeline calls
            def check_model(self, model, image_processor): pass
            def references_in_gallery(self, ids, embeds, backend): return [None] * len(ids)
            def topk(self, queries, k, similarity=None, backend="exact", exclude=None):
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


def test_retrieve_cli_and_pipeline_refuse_what_they_cannot_do_naming_the_option(saved_tiny_model, image_dir,
                                                                                tmp_path, capsys):
    import retrieve

    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    index.save(tmp_path / "idx")
    search = ["search", "--index", str(tmp_path / "idx"), "--text", "red circle"]
    for bad in ("-1", "0", "two"):
        with pytest.raises(SystemExit):
            retrieve.main([*search, "--top_k", bad])
        assert f"--top_k: expected a whole number of at least 1, got '{bad}'" in capsys.readouterr().err
    missing = tmp_path / "models" / "stage2"
    with pytest.raises(SystemExit, match=rf"--model {missing}: no such directory.*or a Hub model id"):
        retrieve.main([*search, "--model", str(missing)])
    with pytest.raises(FileNotFoundError, match=r"--reference .*nope.png: no such image file"):
        retrieve.main([*search, "--reference", str(tmp_path / "nope.png")])
    with pytest.raises(SystemExit, match=r"Pass --reference IMAGE \(or --reference_id GALLERY_ID\), --text TEXT"):
        retrieve.main(["search", "--index", str(tmp_path / "idx"), "--text", "  "])
    pipe = retrieval_pipeline(model, processor)
    for blank in ("", "   ", "\t\n"):
        with pytest.raises(ValueError, match="A query needs a reference image, a modification text, or both"):
            pipe(text=blank, gallery=index)
    reference = str(image_dir / "im02.png")
    assert pipe(reference, "   ", gallery=index, top_k=3) == pipe(reference, gallery=index, top_k=3)  # image-only
    with pytest.raises(ValueError, match="top_k must be a whole number of results of at least 1, got -1"):
        pipe(reference, "red circle", gallery=index, top_k=-1)
def test_retrieve_cli_searches_a_dataset_index_by_gallery_id(tiny_model_dir, tiny_cir_dataset, tmp_path):
    import retrieve

    retrieve.main(["index", "--model", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset), "--split", "val",
                   "--output", str(tmp_path / "idx")])
    index = CIRIndex.load(tmp_path / "idx")
    reference, n = index.image_ids[2], len(index)
    search = ["search", "--index", str(tmp_path / "idx"), "--reference_id", reference, "--text", "make it blue",
              "--top_k", str(n)]
    hits = retrieve.main([*search, "--json", str(tmp_path / "hits.json"), "--html", str(tmp_path / "hits.html")])
    assert len(hits) == n - 1 and reference not in [h["image_id"] for h in hits]
    written = json.loads((tmp_path / "hits.json").read_text())
    assert written["query"]["reference_id"] == reference and written["results"] == hits
    assert all(h["path"] == f"{tiny_cir_dataset}:val:{h['image_id']}" for h in written["results"])
    kept = retrieve.main([*search, "--keep_reference"])
    assert [h for h in kept if h["image_id"] != reference] == hits
    # The reference by id is the same query as its image.
    model = CLIP4CIRModel.from_pretrained(tiny_model_dir).eval()
    pipe = retrieval_pipeline(model, CLIP4CIRProcessor.from_pretrained(tiny_model_dir))
    assert pipe(index.open_image(reference), "make it blue", gallery=index, top_k=n) == hits
    page = _Page.parse((tmp_path / "hits.html").read_text())
    assert [f["data-image-id"] for f in page.sections[0]["hits"]] == [h["image_id"] for h in hits]
    with pytest.raises(SystemExit, match="not an image of the index"):
        retrieve.main(["search", "--index", str(tmp_path / "idx"), "--reference_id", "ghost", "--text", "x"])


def test_retrieve_cli_builds_a_faiss_index_with_the_index_and_reuses_it(tiny_model_dir, image_dir, tmp_path, capsys):
    pytest.importorskip("faiss")
    import retrieve

    retrieve.main(["index", "--model", str(tiny_model_dir), "--images", str(image_dir), "--output",
                   str(tmp_path / "idx"), "--faiss", "hnsw"])
    assert (tmp_path / "idx" / "faiss.json").is_file() and (tmp_path / "idx" / "faiss.index").is_file()
    search = ["search", "--index", str(tmp_path / "idx"), "--reference", str(image_dir / "im03.png"), "--text",
              "make it blue", "--top_k", "5"]
    exact = retrieve.main(search)
    capsys.readouterr()
    approx = retrieve.main([*search, "--backend", "faiss"])  # 12 images: the graph finds the exact top 5
    assert [h["image_id"] for h in approx] == [h["image_id"] for h in exact]
    assert [h["score"] for h in approx] == pytest.approx([h["score"] for h in exact], abs=1e-6)
    assert "saved the FAISS index" not in capsys.readouterr().out  # loaded with the index
    for name in ("faiss.json", "faiss.index"):
        (tmp_path / "idx" / name).unlink()
    assert retrieve.main([*search, "--backend", "faiss"]) == approx
    assert "saved the FAISS index" in capsys.readouterr().out and (tmp_path / "idx" / "faiss.json").is_file()
    # Settings that do not fit the gallery: the gallery index is kept, and a FAISS index is added to it alone.
    index = ["index", "--model", str(tiny_model_dir), "--output", str(tmp_path / "idx"), "--faiss", "ivfpq"]
    with pytest.raises(SystemExit, match="(?s)too few.*is saved; to add a FAISS index"):
        retrieve.main([*index, "--images", str(image_dir), "--overwrite_output_dir"])
    retrieve.main([*index, "--nlist", "2", "--nbits", "2", "--m", "4", "--train_size", "12"])
    assert json.loads((tmp_path / "idx" / "faiss.json").read_text())["settings"]["kind"] == "ivfpq"
    assert [h["image_id"] for h in retrieve.main([*search, "--backend", "faiss"])] == [h["image_id"] for h in exact]


# ------------------------------------------------------------------------------------------------ demo
def test_demo_query_returns_the_pipeline_results(saved_tiny_model, image_dir):
    import demo

    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    pipe = retrieval_pipeline(model, processor)
    app = demo.RetrievalDemo(pipe, index)
    from PIL import Image

    reference = Image.open(image_dir / "im05.png").convert("RGB")  # a gallery image: left out of its results
    expected = pipe(reference, "red circle", gallery=index, top_k=6)
    page, hits, status = app.run(reference, "red circle", 6)
    # what the browser receives: ranks, ids and scores, no server path
    assert hits == [{"rank": r, "image_id": h["image_id"], "score": pytest.approx(h["score"], abs=1e-6)}
                    for r, h in enumerate(expected, 1)]
    assert str(image_dir) not in json.dumps(hits) and "im05.png" not in [h["image_id"] for h in hits]
    figures = _Page.parse(f"<section class='query'>{page}</section>").sections[0]
    assert [f["data-image-id"] for f in figures["hits"]] == [h["image_id"] for h in expected]
    assert [float(f["data-score"]) for f in figures["hits"]] == pytest.approx([h["score"] for h in expected], abs=1e-6)
    assert "top 6 of 12" in status and "uploaded" in status
    # A picked gallery image is queried by its id: the same results, with the id named.
    picked, hits_by_id, status = app.run(reference, "red circle", 6, reference_id="im05.png")
    assert hits_by_id == hits and "`im05.png`" in status
    kept = app.run(reference, "red circle", 6, reference_id="im05.png", keep_reference=True)[1]
    assert "im05.png" in [h["image_id"] for h in kept]
    assert app.run(None, "", 6) == ("", {}, f"**{demo.EMPTY_QUERY}.**")  # shown on the page, not only in JSON


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
    # Shipped for `trust_remote_code`: no import of this package, relative or absolute, except one guarded by
    # `except ImportError` (the package's image rule, used where it is installed).
    tree = ast.parse(pipeline_source)
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
               and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in t.handlers)
               for n in ast.walk(ast.Module(body=t.body, type_ignores=[]))}
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in guarded]
    imported = {a.name.split(".")[0] for n in imports if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] if n.level == 0 else "." for n in imports if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "os", "torch", "transformers", "PIL"}, imported


def test_demo_shows_a_real_error_refuses_a_foreign_index_and_rebuilds_a_stale_cache(saved_tiny_model, image_dir,
                                                                                  tmp_path):
    import demo
    from conftest import tiny_model, write_pairs_csv

    from datasets_scripts.custom import build_custom

    model_dir, model, processor = saved_tiny_model
    other = tiny_model(seed=5)
    foreign = CIRIndex.build(other, processor.image_processor, image_dir, show_progress_bar=False)
    page, shown, status = demo.RetrievalDemo(retrieval_pipeline(model, processor), foreign).run(None, "red circle", 4)
    assert page == "" and shown["error"].startswith("ModelMismatchError: This gallery index was built by")
    assert status == f"**{shown['error']}**"  # on the page, not only in the JSON box
    assert str(tmp_path) not in shown["error"] and ".../tiny_model" in shown["error"]
    foreign.save(tmp_path / "foreign.idx")
    with pytest.raises(SystemExit, match=r"--index .*foreign.idx does not fit --model .*Rebuild the index"):
        demo.main(["--model", str(model_dir), "--index", str(tmp_path / "foreign.idx")])
    # the recipe's cached test gallery, built by an earlier model of the same name: built again, not shown stale
    recipe = tmp_path / "recipe"
    write_pairs_csv(tmp_path / "pairs.csv", [("im01", "make it blue", "im02"), ("im03", "red circle", "im05")])
    build_custom(image_dir, tmp_path / "pairs.csv", recipe / "benchmark", split="test", all_images_in_corpus=True)
    cached = recipe / f"test_gallery.{model_dir.name}.idx"
    foreign.save(cached)
    index = demo.recipe_index(model, processor, recipe, str(model_dir))
    index.check_model(model, processor.image_processor)
    assert CIRIndex.load(cached).fingerprint == index.fingerprint and len(index) == 12
    with pytest.raises(SystemExit, match=r"without --index.*retrieve.py index --model"):
        demo.recipe_index(model, processor, tmp_path / "no_recipe", str(model_dir))


@pytest.mark.slow
def test_the_demo_page_shows_the_error_and_no_server_path(saved_tiny_model, image_dir):
    """Through the page's own handler and components (gradio, not launched): what the browser would receive."""
    gr = pytest.importorskip("gradio")
    import demo
    from conftest import tiny_model

    _, model, processor = saved_tiny_model
    pipe = retrieval_pipeline(model, processor)
    for index, expect_error in ((CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False),
                                 False),
                                (CIRIndex.build(tiny_model(seed=5), processor.image_processor, image_dir,
                                                show_progress_bar=False), True)):
        ui = demo.build_ui(demo.RetrievalDemo(pipe, index), "demo")
        handler = next(fn for fn in ui.fns.values() if fn.name == "search")
        blocks = {type(block): block for block in handler.outputs}
        page, shown, status = handler.fn(None, None, "red circle", 4, False)  # image, picked id, text, k, keep
        sent = json.dumps(blocks[gr.JSON].postprocess(shown).model_dump()) + blocks[gr.Markdown].postprocess(status) \
            + blocks[gr.HTML].postprocess(page)
        assert ("This gallery index was built by" in sent) == expect_error and "null" not in sent
        assert ("<figure" in page) != expect_error
        assert str(image_dir.parent) not in sent  # no folder of the server: the gallery's, the model's
