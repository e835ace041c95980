"""The gallery index: build / add / save / load round trips, exact search equal to brute force (ties, exclusion,
multi-vector targets) with the scores of the model's similarity, the one target-side fingerprint (another model is
refused, a stage-2 model — SPRC's stage 1 included — keeps its stage-1 index), the files on disk checked on load
(swapped, truncated, foreign, int or NaN embeddings, an old format), the resumable build, and FAISS."""

import copy
import json
import shutil

import pytest
import torch
from conftest import brute_force_topk, retrieval_pipeline, solid_images, tiny_model
from safetensors.torch import save_file

import modeling_spn4cir.retrieval.index_storage as index_storage
from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRModel
from modeling_spn4cir.cir_contract import max_token_similarity
from modeling_spn4cir.retrieval import CIRIndex, IndexFileError, ModelMismatchError, model_fingerprint


# A gallery of synthetic embeddings has no model; its fingerprint has the fields a saved index must carry.
SYNTHETIC_FINGERPRINT = {"model": "synthetic", "model_class": "none", "target_side_weights": "none",
                         "image_processor": "none"}


# ------------------------------------------------------------------------------------------------ index
def test_index_round_trip_and_add_equal_a_fresh_index(saved_tiny_model, image_dir, tmp_path):
    _, model, processor = saved_tiny_model
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
    index = CIRIndex(gallery, [f"g{i}" for i in range(300)], [None] * 300, SYNTHETIC_FINGERPRINT)
    indices, scores = index.topk(queries, 10)
    full = queries @ gallery.T
    assert indices.tolist() == brute_force_topk(full, 10)
    torch.testing.assert_close(scores, full.gather(1, indices))
    assert indices[0, :2].tolist() == [5, 17]
    # Per-query exclusion, some queries excluding nothing.
    exclude = ["g5", None, "g9", None, None, None, "g0"]
    got, _ = index.topk(queries, 10, exclude=exclude)
    masked = full.clone()
    for row, e in enumerate(exclude):
        if e is not None:
            masked[row, int(e[1:])] = float("-inf")
    assert got.tolist() == brute_force_topk(masked, 10)
    # Multi-vector targets [N, Q, D] ranked by max over tokens (SPRC).
    tokens = torch.nn.functional.normalize(torch.randn(50, 4, 8), dim=-1)
    multi = CIRIndex(tokens, [str(i) for i in range(50)], [None] * 50, SYNTHETIC_FINGERPRINT)
    with pytest.raises(ValueError, match="similarity=model.similarity"):
        multi.topk(queries, 5)
    got, _ = multi.topk(queries, 5, similarity=max_token_similarity)
    assert got.tolist() == brute_force_topk(max_token_similarity(queries, tokens), 5)


def test_model_mismatch_is_refused_naming_both_and_stage2_keeps_the_index(saved_tiny_model, image_dir):
    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    other = tiny_model(seed=1)
    with pytest.raises(ModelMismatchError) as error:
        index.check_model(other, processor.image_processor)
    mine, theirs = index.fingerprint, model_fingerprint(other, processor.image_processor)
    message = str(error.value)
    assert mine["target_side_weights"][:12] in message and theirs["target_side_weights"][:12] in message
    with pytest.raises(ModelMismatchError):
        retrieval_pipeline(other, processor)(None, "red circle", gallery=index)
    # Another image preprocessing is another model too.
    with pytest.raises(ModelMismatchError, match="image processor"):
        index.check_model(model, CLIP4CIRImageProcessor(size=32, preprocessing="resize"))
    # Stage 2 trains only the query side: the index built by the stage-1 model stays valid.
    stage2 = CLIP4CIRModel.from_pretrained(mine["model"]).eval()
    with torch.no_grad():
        for p in stage2.query_side_parameters():
            p.add_(0.1)
    index.check_model(stage2, processor.image_processor)


def _clustered(n, dim=32, centres=40, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    middles = torch.randn(centres, dim, generator=torch.Generator().manual_seed(123))
    points = middles[torch.randint(0, centres, (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(points, dim=-1)


def _recall(approx, exact):
    return sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist())) / exact.numel()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_faiss_backend_recall_against_exact(kind):
    pytest.importorskip("faiss")
    gallery, queries = _clustered(4000), _clustered(50, seed=1)
    index = CIRIndex(gallery, [str(i) for i in range(4000)], [None] * 4000, SYNTHETIC_FINGERPRINT)
    index.build_faiss(kind=kind, nlist=32, nprobe=8, nbits=6)  # nbits: IVF-PQ only (fewer codes, faster training)
    exact, _ = index.topk(queries, 10)
    approx, scores = index.topk(queries, 10, backend="faiss")
    assert _recall(approx, exact) >= 0.95
    # Scores are the exact ones of the returned images (re-scored), in exact order among them.
    torch.testing.assert_close(scores, (queries @ gallery.T).gather(1, approx), atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    excluded, _ = index.topk(queries, 10, backend="faiss", exclude=[str(i) for i in exact[:, 0].tolist()])
    assert not (excluded == exact[:, :1]).any() and excluded.shape == (50, 10)
    if kind == "ivfpq":  # on unclustered vectors, more cells visited find more of the true top 10
        assert index.faiss_index().settings.m == 4  # width 32 / 8
        uniform = torch.nn.functional.normalize(torch.randn(3000, 32, generator=torch.Generator().manual_seed(0)), -1)
        index = CIRIndex(uniform, [str(i) for i in range(3000)], [None] * 3000, SYNTHETIC_FINGERPRINT)
        index.build_faiss(kind="ivfpq", nlist=32, nprobe=1, nbits=6)
        exact, _ = index.topk(queries, 10)
        recalls = [_recall(index.topk(queries, 10, backend="faiss", nprobe=n)[0], exact) for n in (1, 4, 32)]
        assert recalls[0] + 0.1 < recalls[1] < recalls[2] - 0.1, recalls


def test_a_faiss_index_is_saved_with_the_index_and_a_stale_one_is_rebuilt(tmp_path, caplog):
    pytest.importorskip("faiss")
    from modeling_spn4cir.retrieval import faiss_backend

    gallery, queries = _clustered(1000), _clustered(20, seed=1)
    index = CIRIndex(gallery, [str(i) for i in range(1000)], [None] * 1000, SYNTHETIC_FINGERPRINT)
    index.build_faiss(kind="ivfpq", nlist=16, nprobe=2, m=8, nbits=4)
    expected = index.topk(queries, 10, backend="faiss")
    index.save(tmp_path / "idx")
    assert {"faiss.index", "faiss.json"} <= {p.name for p in (tmp_path / "idx").iterdir()}
    built = []
    original_build = faiss_backend.FaissIndex.build
    faiss_backend.FaissIndex.build = classmethod(lambda cls, *a: built.append(a) or original_build.__func__(cls, *a))
    try:
        loaded = CIRIndex.load(tmp_path / "idx")
        assert loaded.has_faiss() and loaded.faiss_index().settings == index.faiss_index().settings
        got = loaded.topk(queries, 10, backend="faiss")
        assert torch.equal(got[0], expected[0]) and built == []  # loaded, not rebuilt
        # Other embeddings under the same name: the saved FAISS index is stale and rebuilt with its settings.
        changed = CIRIndex(_clustered(1000, seed=5), index.image_ids, index.paths, index.fingerprint)
        changed.save(tmp_path / "other")
        shutil.copy(tmp_path / "idx" / "faiss.index", tmp_path / "other" / "faiss.index")
        shutil.copy(tmp_path / "idx" / "faiss.json", tmp_path / "other" / "faiss.json")
        with caplog.at_level("WARNING"):
            stale = CIRIndex.load(tmp_path / "other")
        assert not stale.has_faiss() and "other embeddings" in caplog.text
        stale.topk(queries, 10, backend="faiss")
        assert len(built) == 1 and built[0][1].kind == "ivfpq" and built[0][1].nlist == 16
        stale.save_faiss(tmp_path / "other")  # what `retrieve.py search` does after a rebuild
        assert CIRIndex.load(tmp_path / "other").has_faiss() and len(built) == 1
        # A damaged file (same size, other bytes) is noticed by its sha256 once its stamp changed.
        data = bytearray((tmp_path / "idx" / "faiss.index").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / "idx" / "faiss.index").write_bytes(bytes(data))
        assert not CIRIndex.load(tmp_path / "idx").has_faiss()
        with pytest.raises(ValueError, match="does not hold this index's embeddings"):
            stale.save_faiss(tmp_path / "idx")
    finally:
        faiss_backend.FaissIndex.build = original_build


def test_added_images_go_into_the_faiss_index_and_settings_errors_name_the_option():
    pytest.importorskip("faiss")
    from modeling_spn4cir.retrieval import FaissSettings

    gallery = _clustered(2000)
    index = CIRIndex(gallery[:1500], [str(i) for i in range(1500)], [None] * 1500, SYNTHETIC_FINGERPRINT)
    index.build_faiss(kind="hnsw")
    index.add = CIRIndex.add.__get__(index)
    extra = CIRIndex(gallery[1500:], [str(i) for i in range(1500, 2000)], [None] * 500, SYNTHETIC_FINGERPRINT)
    merged = CIRIndex(torch.cat([index.embeddings, extra.embeddings]), index.image_ids + extra.image_ids,
                      [None] * 2000, SYNTHETIC_FINGERPRINT)
    faiss_index = index.faiss_index()
    faiss_index.add(extra.embeddings)
    merged._faiss = faiss_index
    assert len(merged.faiss_index()) == 2000
    hits, _ = merged.topk(gallery[1990:], 1, backend="faiss")
    assert hits[:, 0].tolist() == list(range(1990, 2000))  # each added image finds itself
    with pytest.raises(ValueError, match="--m"):
        FaissSettings(kind="ivfpq", m=7).resolved(2000, 32)
    with pytest.raises(ValueError, match="--nlist"):
        FaissSettings(kind="ivfpq", nlist=4096).resolved(2000, 32)
    with pytest.raises(ValueError, match="kind"):
        FaissSettings(kind="flat")
    assert FaissSettings(kind="ivfpq").resolved(1_000_000, 256).nlist == 4096


# ------------------------------------------------------------------------------------- the query's reference
def test_references_are_found_by_id_or_by_their_embedding():
    from modeling_spn4cir.retrieval.references import SAME_IMAGE_COSINE, same_image_rows

    index = _random_index(n=12)
    near = torch.nn.functional.normalize(index.embeddings[5] + 1e-3 * torch.randn(8), dim=-1)  # rounding-like
    far = torch.nn.functional.normalize(index.embeddings[5] + 0.2 * torch.randn(8), dim=-1)  # another image
    assert float(far @ index.embeddings[5]) < SAME_IMAGE_COSINE <= float(near @ index.embeddings[5])
    found = index.references_in_gallery(["g2", None, None], torch.stack([far, near, far]))
    assert found == ["g2", "g5", None]  # by id first; by content where no id is given
    with pytest.raises(KeyError, match="nope"):
        index.references_in_gallery(["nope"])
    # The first of two identical gallery rows; multi-vector rows compare flattened.
    twice = torch.cat([index.embeddings, index.embeddings[5:6]])
    assert same_image_rows(twice, index.embeddings[5:6]) == [5]
    tokens = torch.nn.functional.normalize(torch.randn(6, 3, 8), dim=-1)
    assert same_image_rows(tokens, tokens[[4, 1]]) == [4, 1]
    assert same_image_rows(tokens, tokens[[4]], candidates=torch.tensor([[0, -1, 4]])) == [4]
    assert same_image_rows(tokens, tokens[[4]], candidates=torch.tensor([[0, 1, -1]])) == [None]
    # Left out of the results, unless kept.
    hits = index.search(index.embeddings[[3]], top_k=12, reference_embeds=index.embeddings[[3]])[0]
    assert len(hits) == 11 and "g3" not in [h["image_id"] for h in hits]
    kept = index.search(index.embeddings[[3]], top_k=12, reference_ids=["g3"], keep_reference=True)[0]
    assert kept[0]["image_id"] == "g3" and [h["image_id"] for h in kept[1:]] == [h["image_id"] for h in hits]


def test_references_of_a_faiss_search_are_found_among_its_candidates():
    pytest.importorskip("faiss")
    gallery = _clustered(1000)
    index = CIRIndex(gallery, [str(i) for i in range(1000)], [None] * 1000, SYNTHETIC_FINGERPRINT)
    index.build_faiss(kind="ivfpq", nlist=16, nprobe=4, nbits=4)
    references = torch.nn.functional.normalize(gallery[[7, 999]] + 1e-4 * torch.randn(2, 32), dim=-1)
    assert index.references_in_gallery(reference_embeds=references, backend="faiss") == ["7", "999"]


def test_images_stored_in_a_dataset_are_located_never_none(saved_tiny_model, tiny_cir_dataset):
    import datasets

    _, model, processor = saved_tiny_model
    dataset = {"path": str(tiny_cir_dataset), "name": "corpus", "split": "val"}
    corpus = datasets.load_dataset(**dataset)
    index = CIRIndex.build(model, processor.image_processor, corpus, dataset=dataset, show_progress_bar=False)
    assert index.paths == [None] * len(index)  # the images live inside the dataset's files
    hits = index.search(index.embeddings[:2], top_k=3)
    assert all(h["path"] == f"{tiny_cir_dataset}:val:{h['image_id']}" for row in hits for h in row)
    in_memory = CIRIndex.build(model, processor.image_processor, corpus, show_progress_bar=False)
    assert in_memory.search(index.embeddings[:1], top_k=1)[0][0]["path"] == f"<in-memory corpus>:{corpus[0]['image_id']}"


def test_hits_scores_are_the_models_similarity_of_the_hits(saved_tiny_model, image_dir):
    _, model, processor = saved_tiny_model
    index = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    torch.manual_seed(2)
    with torch.no_grad():
        queries = model.get_target_embeds(torch.randn(3, 3, 32, 32))
        scores = model.similarity(queries, index.embeddings)
    hits = index.search(queries, top_k=5, similarity=model.similarity, exclude=["im01.png", None, "sub/im04.png"])
    for row, query_hits in enumerate(hits):
        positions = [index.image_ids.index(h["image_id"]) for h in query_hits]
        assert [h["score"] for h in query_hits] == pytest.approx(scores[row, positions].tolist(), abs=1e-6)
    assert "im01.png" not in [h["image_id"] for h in hits[0]] and len(hits[1]) == 5


# ------------------------------------------------------------------------------------------------ on disk
def _random_index(n=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1).to(dtype)
    fingerprint = {"model_class": "M", "target_side_weights": f"w{seed}", "image_processor": "p", "model": "m"}
    return CIRIndex(embeddings, [f"g{i}" for i in range(n)], [None] * n, fingerprint, [{"type": "files"}])


def _refused(path, *fragments):
    with pytest.raises(IndexFileError) as error:
        CIRIndex.load(path)
    message = str(error.value)
    assert all(f in message for f in fragments), message
    assert "rebuild the index" in message or "restore" in message
    return message


def test_a_saved_index_is_shards_with_manifests_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(index_storage, "SHARD_ROWS", 5)
    index = _random_index()
    index.save(tmp_path / "idx")
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert names == [".spn4cir_output.json", "embeddings-00000.json", "embeddings-00000.safetensors",
                     "embeddings-00001.json", "embeddings-00001.safetensors", "embeddings-00002.json",
                     "embeddings-00002.safetensors", "index.json"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert [(s["start"], s["stop"]) for s in meta["shards"]] == [(0, 5), (5, 10), (10, 12)]
    loaded = CIRIndex.load(tmp_path / "idx")
    assert torch.equal(loaded.embeddings, index.embeddings) and loaded.image_ids == index.image_ids
    assert loaded.fingerprint == index.fingerprint and loaded.sources == index.sources
    half = _random_index(dtype=torch.float16)
    half.save(tmp_path / "half")
    assert CIRIndex.load(tmp_path / "half").embeddings.dtype == torch.float16
    # A copied index (new file stamps) is verified by its bytes and loads.
    shutil.copytree(tmp_path / "idx", tmp_path / "copy")
    assert torch.equal(CIRIndex.load(tmp_path / "copy").embeddings, index.embeddings)


def test_swapped_truncated_or_foreign_embeddings_files_are_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(index_storage, "SHARD_ROWS", 5)
    _random_index(seed=0).save(tmp_path / "ours")
    _random_index(seed=1).save(tmp_path / "theirs")  # same ids and shapes, another model
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    kept = {name: (ours / name).read_bytes() for name in ("embeddings-00001.safetensors", "embeddings-00001.json")}

    def restore():
        for name, data in kept.items():
            (ours / name).write_bytes(data)

    # swapped: another index's file under our manifest (same size, other bytes)
    shutil.copy(theirs / "embeddings-00001.safetensors", ours / "embeddings-00001.safetensors")
    _refused(ours, "embeddings-00001.safetensors", "sha256")
    # foreign: another index's file with its own manifest (another model's embeddings)
    shutil.copy(theirs / "embeddings-00001.json", ours / "embeddings-00001.json")
    _refused(ours, "embeddings-00001.safetensors", "other inputs")
    restore()
    assert torch.equal(CIRIndex.load(ours).embeddings, _random_index(seed=0).embeddings)  # restored: accepted
    # truncated
    (ours / "embeddings-00001.safetensors").write_bytes(kept["embeddings-00001.safetensors"][:-7])
    _refused(ours, "embeddings-00001.safetensors", "truncated")
    restore()
    # a missing file
    (ours / "embeddings-00002.safetensors").unlink()
    assert "embeddings-00001" not in _refused(ours, "embeddings-00002.safetensors", "missing")


def test_int_or_nan_embeddings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(index_storage, "SHARD_ROWS", 5)
    with pytest.raises(ValueError, match="float32"):
        CIRIndex(torch.ones(3, 4, dtype=torch.int32), ["a", "b", "c"], [None] * 3, {}).save(tmp_path / "int")
    index = _random_index()
    index.save(tmp_path / "idx")
    # An int file whose manifest describes it consistently (as another writer would have made it).
    store = index_storage.embeddings_store(tmp_path / "idx", torch.int32)
    plan = index_storage._plans(index.fingerprint, "float32", index.image_ids, 5)[1]
    store.write(1, plan, {"embeddings": torch.ones(5, 8, dtype=torch.int32)})
    _refused(tmp_path / "idx", "embeddings-00001.safetensors", "I32")
    nan = _random_index()
    nan.embeddings[7, 2] = float("nan")
    nan.save(tmp_path / "nan")
    _refused(tmp_path / "nan", "embeddings-00001.safetensors", "'g7'", "NaN")
    meta = json.loads((tmp_path / "nan" / "index.json").read_text())
    (tmp_path / "nan" / "index.json").write_text(json.dumps({**meta, "dtype": "int64"}))
    _refused(tmp_path / "nan", "index.json", "int64")


def test_an_index_of_the_earlier_format_is_refused_with_rebuild(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    save_file({"embeddings": torch.zeros(2, 4)}, str(old / "embeddings.safetensors"))
    (old / "index.json").write_text(json.dumps({"format": "spn4cir-gallery-index/1", "image_ids": ["a", "b"]}))
    _refused(old, "index.json", "spn4cir-gallery-index/1", "rebuild the index")
    with pytest.raises(FileNotFoundError, match="not a gallery index"):
        CIRIndex.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ resumable build
class _Killed(Exception):
    pass


def _counting(model, kill_after=None):
    """`model`, recording the images its target side encodes; raises `_Killed` on batch `kill_after`."""
    encode, model.encoded = model.get_target_embeds, []

    def counted(pixels):
        if kill_after is not None and len(model.encoded) == kill_after:
            raise _Killed()
        model.encoded.append(len(pixels))
        return encode(pixels)

    model.get_target_embeds = counted
    return model


def test_a_killed_build_resumes_from_its_cache_and_a_changed_image_reencodes_its_shard(saved_tiny_model, image_dir,
                                                                                       tmp_path):
    model_dir, model, processor = saved_tiny_model
    fresh = CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False)
    kwargs = dict(batch_size=2, show_progress_bar=False, cache_dir=tmp_path / "cache", shard_size=4)
    killed = _counting(CLIP4CIRModel.from_pretrained(model_dir).eval(), kill_after=5)
    with pytest.raises(_Killed):  # two shards of 4 images done, the third one half encoded
        CIRIndex.build(killed, processor.image_processor, image_dir, **kwargs)
    resumed = _counting(CLIP4CIRModel.from_pretrained(model_dir).eval())
    index = CIRIndex.build(resumed, processor.image_processor, image_dir, **kwargs)
    assert sum(resumed.encoded) == 4  # only the third shard
    assert index.image_ids == fresh.image_ids and index.fingerprint == fresh.fingerprint
    torch.testing.assert_close(index.embeddings, fresh.embeddings, rtol=0, atol=1e-6)
    assert index.image_ids.index("im06.png") == 4  # in the second shard, rows 4-7
    solid_images(1, size=40, seed=99)[0].save(image_dir / "im06.png")
    again = _counting(CLIP4CIRModel.from_pretrained(model_dir).eval())
    changed = CIRIndex.build(again, processor.image_processor, image_dir, **kwargs)
    assert sum(again.encoded) == 4
    assert torch.equal(changed.embeddings[:4], index.embeddings[:4])
    assert torch.equal(changed.embeddings[8:], index.embeddings[8:])
    assert not torch.equal(changed.embeddings[4], index.embeddings[4])


# ---------------------------------------------------------------------------------------- SPRC's stage 1
def test_a_stage1_sprc_model_builds_an_index_its_stage2_model_accepts(tmp_path):
    """SPRC's stage-1 Q-Former serves both sides: its whole state is its target side, and untying for stage 2
    (a query-side copy) keeps the index."""
    from test_modeling_sprc import _tiny_blip2
    from transformers import Blip2ForImageTextRetrieval

    from modeling_spn4cir import SPRCModel

    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(_tiny_blip2()).save_pretrained(tmp_path / "blip2")
    stage1 = SPRCModel.from_blip2(str(tmp_path / "blip2")).eval()
    assert stage1.qformer_query is None
    processor = CLIP4CIRImageProcessor(size=32)
    paths = []
    for i, image in enumerate(solid_images(6)):
        image.save(tmp_path / f"s{i}.png")
        paths.append(tmp_path / f"s{i}.png")
    index = CIRIndex.build(stage1, processor, paths, show_progress_bar=False)
    assert index.embeddings.shape[:2] == (6, 8)  # 8 query tokens per image
    index.save(tmp_path / "idx")
    stage2 = copy.deepcopy(stage1)
    stage2.untie_query_side()
    stage2.freeze_target_side()
    with torch.no_grad():
        for p in stage2.query_side_parameters():
            p.add_(0.1)
    loaded = CIRIndex.load(tmp_path / "idx")
    loaded.check_model(stage2, processor)
    torch.manual_seed(1)
    with torch.no_grad():
        queries = stage2.get_query_embeds(torch.randint(1, 120, (2, 7)), pixel_values=torch.randn(2, 3, 32, 32))
        scores = stage2.similarity(queries, stage2.get_target_embeds(processor(
            [loaded.open_image(i) for i in loaded.image_ids])["pixel_values"]))
    indices, _ = loaded.topk(queries, 3, similarity=stage2.similarity)
    assert indices.tolist() == brute_force_topk(scores, 3)
    other = copy.deepcopy(stage1)
    with torch.no_grad():
        other.qformer.encoder.layer[0].output.dense.weight.add_(0.1)  # the Q-Former of the target side
    with pytest.raises(ModelMismatchError):
        loaded.check_model(other, processor)


# ------------------------------------------------------------------------------------- galleries and queries
def test_a_folder_gallery_lists_every_format_skips_hidden_folders_and_names_or_counts_bad_images(saved_tiny_model,
                                                                                                  tmp_path):
    from modeling_spn4cir.image_files import BadImageError

    _, model, processor = saved_tiny_model
    folder = tmp_path / "photos"
    (folder / ".thumbnails").mkdir(parents=True)
    images = solid_images(8, seed=4)
    for name, image in zip(("a.png", "b.gif", "c.tif", "d.jpe", "e.webp", "f.bmp", "g.tiff"), images):
        image.save(folder / name)
    images[7].save(folder / ".thumbnails" / "a.png")
    images[7].save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    kwargs = {"show_progress_bar": False}
    with pytest.raises(BadImageError, match=r"1 image file\(s\) cannot be used: image 'gone.png' is a broken symbolic "
                                            r"link.*--skip_bad_images"):
        CIRIndex.build(model, processor.image_processor, folder, **kwargs)
    (folder / "cut.png").write_bytes((folder / "a.png").read_bytes()[:60])
    index = CIRIndex.build(model, processor.image_processor, folder, skip_bad_images=True, **kwargs)
    assert index.image_ids == ["a.png", "b.gif", "c.tif", "d.jpe", "e.webp", "f.bmp", "g.tiff"]
    source = index.sources[0]
    assert sorted(source["bad_images"]) == ["cut.png", "gone.png"]
    assert source["hidden_skipped"] == 2 and source["other_files"] == 1
    (folder / "gone.png").unlink()
    with pytest.raises(BadImageError, match=rf"image 'cut.png' \({folder.resolve() / 'cut.png'}\) does not decode"):
        CIRIndex.build(model, processor.image_processor, folder, **kwargs)  # found while encoding, named


def test_queries_and_embeddings_that_cannot_be_ranked_are_refused():
    index = _random_index()
    queries = index.embeddings[:2].clone()
    for k in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match=rf"top_k must be a whole number of results of at least 1, got {k!r}"):
            index.topk(queries, k)
    queries[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 2 query embeddings hold NaN or inf \(first: query 1\)"):
        index.search(queries, 3)
    with pytest.raises(ValueError, match=r"the queries have width 5, the gallery's embeddings width 8: they come from "
                                         r"different models.*'m'"):
        index.topk(torch.randn(1, 5), 3)
    for bad, why in ((torch.ones(3, 8, dtype=torch.int64), "got torch.int64"), (torch.ones(3), "of shape \\(3,\\)")):
        with pytest.raises(ValueError, match=why):
            CIRIndex(bad, ["a", "b", "c"], [None] * 3, {})
    nan = torch.ones(3, 8)
    nan[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 gallery embeddings hold NaN or inf \(first: row 2\)"):
        CIRIndex(nan, ["a", "b", "c"], [None] * 3, {})


@pytest.mark.parametrize("damage", ["no shards", "ids cut", "shard without sha256", "no fingerprint", "paths a dict",
                                    "bad shape", "manifest cut", "embeddings cut"])
def test_a_damaged_index_names_the_file_and_the_fix(tmp_path, damage):
    _random_index().save(tmp_path / "idx")
    meta_file, manifest = tmp_path / "idx" / "index.json", tmp_path / "idx" / "embeddings-00000.json"
    meta = json.loads(meta_file.read_text())
    edits = {"no shards": lambda m: m.pop("shards"), "ids cut": lambda m: m["image_ids"].pop(),
             "shard without sha256": lambda m: m["shards"][0].pop("sha256"),
             "no fingerprint": lambda m: m["fingerprint"].pop("target_side_weights"),
             "paths a dict": lambda m: m.update(paths={}), "bad shape": lambda m: m.update(embedding_shape=[0])}
    if damage in edits:
        edits[damage](meta)
        meta_file.write_text(json.dumps(meta))
        _refused(tmp_path / "idx", str(meta_file), "damaged or was edited")
    elif damage == "manifest cut":
        manifest.write_text(manifest.read_text()[:25])
        _refused(tmp_path / "idx", "embeddings-00000.safetensors", "manifest")
    else:
        shard = tmp_path / "idx" / "embeddings-00000.safetensors"
        shard.write_bytes(shard.read_bytes()[:50])
        _refused(tmp_path / "idx", "embeddings-00000.safetensors")


def test_an_index_serves_only_the_images_under_its_gallery(saved_tiny_model, image_dir, tmp_path):
    """A path edited into index.json (outside the gallery folder, or escaping it with ..) is refused when an image is
    opened for a page or the demo, naming the path and the folder; searching still works."""
    _, model, processor = saved_tiny_model
    CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False).save(tmp_path / "idx")
    secret = tmp_path / "private.png"
    solid_images(1, seed=9)[0].save(secret)
    meta_file = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_file.read_text())
    assert meta["sources"][0]["root"] == str(image_dir.resolve())
    for crafted in (str(secret), str(image_dir.resolve() / ".." / "private.png")):
        meta["paths"][0] = crafted
        meta_file.write_text(json.dumps(meta))
        index = CIRIndex.load(tmp_path / "idx")
        assert len(index.search(index.embeddings[:1], 3)[0]) == 3
        with pytest.raises(IndexFileError, match=rf"listed at {crafted}, outside its gallery folder "
                                                 rf"{image_dir.resolve()}.*rebuild the index"):
            index.open_image(index.image_ids[0])
        assert index.open_image(index.image_ids[1]).size == (40, 40)  # its own images are served
    meta["sources"][0].pop("root")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="does not record the folder"):
        CIRIndex.load(tmp_path / "idx").open_image(meta["image_ids"][1])


def test_an_empty_gallery_and_an_edited_dataset_reference_are_refused(tmp_path):
    empty = CIRIndex(torch.empty(0, 8), [], [], {"model_class": "M"})
    with pytest.raises(ValueError, match="holds no images: there is nothing to rank"):
        empty.search(torch.ones(1, 8), 3)
    index = CIRIndex(torch.eye(2), ["a", "b"], [None, None], {"model_class": "M"},
                     [{"type": "corpus", "dataset": {"path": "corpus_dir", "cache_dir": "/anywhere"}}])
    with pytest.raises(IndexFileError, match=r"not a dataset reference an index writes \(keys \['name', 'path', "
                                             r"'split'\]\)"):
        index.open_image("a")
