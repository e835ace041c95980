"""Positive scaling: MLLM captioner on a tiny LLaVA (real processor + generate), retrieval and column
captioners, exact rank-window pairing, templates, resumable captioning, the scaled-triplets dataset."""


import datasets
import numpy as np
import pytest
import torch
from conftest import save_tiny_llava
from PIL import Image

from datasets_scripts.captioners import (
    FASHIONIQ_PROMPT,
    ColumnCaptioner,
    MLLMCaptioner,
    RetrievalCaptioner,
    limit_words,
)
from datasets_scripts.captioning import caption_corpus
from datasets_scripts.pairing import random_pairs, rank_window_pairs
from datasets_scripts.positive_scaling import generate_scaled_triplets
from datasets_scripts.templates import TEMPLATES, compose_modification_texts, resolve_templates

WORDS = "please briefly describe the image dress shirt in 5 words a red blue green with long short sleeves".split()


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A randomly initialized LLaVA saved like a Hub checkpoint (`conftest.save_tiny_llava`)."""
    return save_tiny_llava(tmp_path_factory.mktemp("llava"), WORDS)


def test_mllm_captioner_end_to_end(tiny_llava):
    captioner = MLLMCaptioner(str(tiny_llava), prompt=FASHIONIQ_PROMPT, num_words=3, max_new_tokens=12,
                              word_limit=3, prompt_prefix="")
    assert captioner.prompt_for("dress") == "please briefly describe the dress in 3 words"
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 50), (0, 0, 255)),
              Image.new("L", (30, 30), 128)]
    batch = {"image": images, "category": ["dress", "shirt", "dress"]}
    prompts = []
    generate = captioner.model.generate

    def recording_generate(**inputs):
        prompts.extend(captioner.processor.batch_decode(inputs["input_ids"], skip_special_tokens=False))
        return generate(**inputs)

    captioner.model.generate = recording_generate
    captions = captioner(batch)
    # The prompt, with each image's category, reaches the model through the chat template: "user :" before the
    # image tokens and "assistant :" after the text (both outside this tiny vocabulary, hence <unk> <unk>).
    assert len(prompts) == 3
    for prompt, category in zip(prompts, ["dress", "shirt", "dress"]):
        words = [w for w in prompt.split() if w != "<pad>"]
        first_text = words.index("please")
        assert words[:2] == ["<unk>", "<unk>"] and set(words[2:first_text]) == {"<image>"}
        assert words[first_text:] == ["please", "briefly", "describe", "the", category, "in", "<unk>", "words",
                                      "<unk>", "<unk>"]
    captioner.model.generate = generate
    assert len(captions) == 3
    assert all(isinstance(c, str) and len(c.split()) <= 3 for c in captions)
    assert any(c for c in captions)  # the random model does generate words
    assert captioner(batch) == captions  # greedy decoding is deterministic
    assert set(" ".join(captions).split()) <= set(WORDS)


def test_mllm_captioner_original_form_keeps_the_whole_answer(tiny_llava):
    """The original's settings by default: "user: " before the prompt, max_new_tokens 1024, the whole answer; the
    word limit is an option that only cuts that answer."""
    original = MLLMCaptioner(str(tiny_llava), prompt=FASHIONIQ_PROMPT, num_words=5)
    assert original.prompt_for("dress") == "user: please briefly describe the dress in 5 words"
    assert original.max_new_tokens == 1024 and original.word_limit is None
    original.max_new_tokens = 12  # keep the tiny model's generation short
    limited = MLLMCaptioner(str(tiny_llava), prompt=FASHIONIQ_PROMPT, num_words=5, max_new_tokens=12, word_limit=2)
    batch = {"image": [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 50), (0, 0, 255))],
             "category": ["dress", "shirt"]}
    full, cut = original(batch), limited(batch)
    assert any(len(c.split()) > 2 for c in full)  # not cut
    assert cut == [limit_words(c, 2) for c in full]


def test_limit_words():
    assert limit_words("a red dress with long sleeves.", 3) == "a red dress"
    assert limit_words("red.\nblue", 5) == "red. blue"


class ColourEncoder:
    """An encoder with known geometry: an image's embedding is its mean colour; a phrase's is its colour word."""

    COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
    device = "cpu"

    @staticmethod
    def image_processor(images, return_tensors="pt"):
        arrays = [np.asarray(im.convert("RGB").resize((4, 4)), dtype=np.float32).transpose(2, 0, 1) for im in images]
        return {"pixel_values": torch.tensor(np.stack(arrays))}

    def encode_pixels(self, pixels):
        return torch.nn.functional.normalize(pixels.mean((2, 3)), dim=-1)

    def encode_images(self, images):
        return self.encode_pixels(self.image_processor(images)["pixel_values"])

    def encode_texts(self, texts):
        x = torch.tensor([[c for w in t.split() if w in self.COLOURS for c in self.COLOURS[w]][:3] or [0.1, 0.1, 0.1]
                          for t in texts])
        return torch.nn.functional.normalize(x, dim=-1)


def test_retrieval_captioner_picks_the_right_phrase():
    captioner = RetrievalCaptioner(ColourEncoder(), ["a green thing", "a red thing", "a blue thing"], top_k=1)
    images = [Image.new("RGB", (4, 4), (250, 10, 0)), Image.new("RGB", (4, 4), (0, 20, 200)),
              Image.new("RGB", (4, 4), (5, 240, 30))]
    assert captioner({"image": images}) == ["a red thing", "a blue thing", "a green thing"]
    two = RetrievalCaptioner(ColourEncoder(), ["a green thing", "a red thing", "a blue thing"], top_k=2)
    assert two({"image": [Image.new("RGB", (4, 4), (200, 100, 0))]}) == ["a red thing and a green thing"]


def test_column_captioner():
    assert ColumnCaptioner(column="caption")({"caption": ["x", "y"]}) == ["x", "y"]
    assert ColumnCaptioner(mapping={"a": "cap a"})({"image_id": ["a"]}) == ["cap a"]
    with pytest.raises(KeyError, match="1 images"):
        ColumnCaptioner(mapping={"a": "cap a"})({"image_id": ["b"]})


# --------------------------------------------------------------------------------------------- pairing
def naive_rank(embeddings, ref, target):
    x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    scores = x[ref] @ x.T
    scores[ref] = float("inf")
    order = torch.sort(-scores, stable=True).indices.tolist()
    return order.index(target)


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_rank_window_pairs_are_exact(chunk):
    emb = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    emb[17] = emb[3]  # a duplicate of an image: the reference must still be rank 0
    pairs = rank_window_pairs(emb, rank_min=50, rank_max=120, k=3, seed=1, chunk_size=chunk, show_progress_bar=False)
    assert len(pairs) == 300 * 3
    for p in pairs:
        assert 50 <= p.rank < 120 and p.target != p.reference
        assert naive_rank(emb, p.reference, p.target) == p.rank
    by_ref = {}
    for p in pairs:
        by_ref.setdefault(p.reference, []).append(p.rank)
    assert all(len(set(r)) == 3 for r in by_ref.values())  # k distinct ranks
    assert pairs == rank_window_pairs(emb, rank_min=50, rank_max=120, k=3, seed=1, chunk_size=64,
                                      show_progress_bar=False)  # deterministic, chunk-independent
    assert pairs != rank_window_pairs(emb, rank_min=50, rank_max=120, k=3, seed=2, show_progress_bar=False)


def test_references_only_and_window_validation():
    emb = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    pairs = rank_window_pairs(emb, reference_indices=[5, 9], rank_min=3, rank_max=10, k=2, show_progress_bar=False)
    assert {p.reference for p in pairs} == {5, 9} and len(pairs) == 4
    with pytest.raises(ValueError, match="rank window"):
        rank_window_pairs(emb, rank_min=3, rank_max=4, k=2, show_progress_bar=False)
    with pytest.raises(ValueError, match="rank_min"):
        rank_window_pairs(emb, rank_min=50, rank_max=60, show_progress_bar=False)
    rp = random_pairs(10, k=3, seed=0)
    assert len(rp) == 30 and all(p.target != p.reference and p.rank is None for p in rp)
    assert rp == random_pairs(10, k=3, seed=0)


# ------------------------------------------------------------------------------------------- templates
def test_templates_and_fallback():
    assert resolve_templates(None, "fashioniq") == ["{1}"]
    assert resolve_templates(None, "cirr") == [TEMPLATES[0], TEMPLATES[1]]
    assert resolve_templates(["2", "the {1}, not {0}"]) == ["{1}", "the {1}, not {0}"]
    with pytest.raises(ValueError, match="must contain"):
        resolve_templates(["no target"])

    class WordTokenizer:
        def __call__(self, text):
            return {"input_ids": text.split()}

    texts = compose_modification_texts("a red dress", "a blue shirt", resolve_templates(None, "cirr"))
    assert texts == ["a blue shirt instead of a red dress", "Unlike a red dress, I want a blue shirt"]
    long_ref = " ".join(["word"] * 80)
    fallback = compose_modification_texts(long_ref, "a blue shirt", resolve_templates(None, "cirr"), WordTokenizer(), 77)
    assert fallback == ["a blue shirt", "a blue shirt"]


# ------------------------------------------------------------------------------- caption runs, dataset
def _corpus(n=12):
    colours = [(250, 10, 0), (0, 20, 200), (5, 240, 30)]
    images = [Image.new("RGB", (8, 8), colours[i % 3]) for i in range(n)]
    return datasets.Dataset.from_dict({"image_id": [f"g{i:02d}" for i in range(n)], "image": images},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


class FlakyCaptioner:
    """Fails on its `fail_on`-th call: an interrupted caption run."""

    def __init__(self, inner, fail_on=None):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.phrases = inner.phrases

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("killed")
        return self.inner(batch)


def test_resume_after_interrupted_caption_run(tmp_path):
    corpus = _corpus(12)
    phrases = ["a green thing", "a red thing", "a blue thing"]
    base = RetrievalCaptioner(ColourEncoder(), phrases)
    flaky = FlakyCaptioner(base, fail_on=3)
    with pytest.raises(RuntimeError, match="killed"):
        caption_corpus(corpus, flaky, tmp_path / "cache", shard_size=4, batch_size=2, show_progress_bar=False)
    assert sorted(p.name for p in (tmp_path / "cache").glob("captions-*")) == ["captions-00000.json",
                                                                             "captions-00000.jsonl"]  # + manifest
    resumed = FlakyCaptioner(base)
    out_resumed = generate_scaled_triplets(corpus, resumed, tmp_path / "resumed", encoder=ColourEncoder(),
                                           rank_window=(4, 8), dataset="cirr", caption_cache_dir=tmp_path / "cache",
                                           shard_size=4, batch_size=2, show_progress_bar=False).path
    assert resumed.calls == 4  # shards 1 and 2 only (2 batches each)
    clean = generate_scaled_triplets(corpus, FlakyCaptioner(base), tmp_path / "clean", encoder=ColourEncoder(),
                                     rank_window=(4, 8), dataset="cirr", shard_size=4, batch_size=2,
                                     show_progress_bar=False).path
    a = datasets.load_dataset(str(out_resumed), "triplets", split="train").to_list()
    b = datasets.load_dataset(str(clean), "triplets", split="train").to_list()
    assert a == b and len(a) == 12
    with pytest.raises(ValueError, match="another run"):
        caption_corpus(corpus, ColumnCaptioner(mapping={}), tmp_path / "cache", shard_size=4)


def test_scaled_triplets_dataset(tmp_path):
    corpus = _corpus(12)
    captioner = RetrievalCaptioner(ColourEncoder(), ["a green thing", "a red thing", "a blue thing"])
    scaled = generate_scaled_triplets(corpus, captioner, tmp_path / "scaled", encoder=ColourEncoder(),
                                      reference_ids=["g00", "g01"], rank_window=(2, 6), k=2, dataset="cirr",
                                      show_progress_bar=False)
    out = scaled.path
    triplets = datasets.load_dataset(str(out), "triplets", split="train")
    assert len(triplets) == 4 and set(triplets["reference_id"]) == {"g00", "g01"}
    row = triplets[0]
    assert row["source"] == "generated" and row["reference_caption"] == "a red thing"
    assert row["modification_texts"] == [f"{row['target_caption']} instead of a red thing",
                                         f"Unlike a red thing, I want {row['target_caption']}"]
    assert all(2 <= r < 6 for r in triplets["pair_rank"])
    corpus_out = datasets.load_dataset(str(out), "corpus", split="train")
    assert set(corpus_out["image_id"]) == set(triplets["reference_id"]) | set(triplets["target_id"])
    # what it returns is what it wrote: the triplets, and the captions of the images they use, in corpus order
    assert scaled.triplets == triplets.to_list()
    assert list(scaled.captions.items()) == list(zip(corpus_out["image_id"], corpus_out["caption"]))
    first = corpus_out[0]
    assert first["caption"] and np.array_equal(np.asarray(first["image"]),
                                               np.asarray(corpus[int(first["image_id"][1:])]["image"]))


def test_generate_triplets_end_to_end(tiny_cir_dataset, tiny_model_dir, tmp_path):
    """The CLI on a tiny corpus: retrieval captions from a CIR model, rank-window pairs among the annotated
    references, CIRR's two templates; the written dataset is checked row by row."""
    import datasets
    import generate_triplets

    help_text = generate_triplets.build_parser().format_help()
    assert "FashionIQ" in help_text and "CIRR" in help_text and "--references_only" in help_text
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("red circle\nblue square\ngreen triangle\n")
    out = tmp_path / "generated"
    generate_triplets.main([
        "--dataset", str(tiny_cir_dataset), "--output_dir", str(out), "--captioner", "retrieval",
        "--encoder", str(tiny_model_dir), "--phrases", str(phrases), "--top_k_phrases", "1",
        "--rank_min", "2", "--rank_max", "8", "--targets_per_reference", "2", "--references_only", "--templates", "0", "1",
        "--caption_cache_dir", str(tmp_path / "captions"),
    ])
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    annotated = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    generated = datasets.load_dataset(str(out), "triplets", split="train")
    generated_corpus = datasets.load_dataset(str(out), "corpus", split="train")
    captions = dict(zip(generated_corpus["image_id"], generated_corpus["caption"]))
    references = set(annotated["reference_id"])
    assert len(generated) == 2 * len(references)  # k targets per annotated reference
    assert set(generated["reference_id"]) == references
    assert set(generated["target_id"]) <= set(corpus["image_id"])
    assert all(r != t for r, t in zip(generated["reference_id"], generated["target_id"]))
    assert set(generated["source"]) == {"generated"}
    for row in generated:
        ref, tgt = captions[row["reference_id"]], captions[row["target_id"]]
        assert ref in ("red circle", "blue square", "green triangle")
        assert row["modification_texts"] == [f"{tgt} instead of {ref}", f"Unlike {ref}, I want {tgt}"]


def _scaling_corpus(ids, colours):
    from PIL import Image

    return datasets.Dataset.from_dict(
        {"image_id": list(ids), "image": [Image.new("RGB", (8, 8), c) for c in colours]},
        features=datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()}))


class _PixelCaptioner:
    """Captions an image by its colour and records which ids it was asked to caption."""

    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        self.seen += batch["image_id"]
        return [f"a {image.getpixel((0, 0))} square" for image in batch["image"]]


def test_positive_scaling_refuses_empty_captions_and_k0_and_never_reuses_stale_captions(tmp_path):
    from datasets_scripts.captioners import ColumnCaptioner
    from datasets_scripts.captioning import caption_corpus
    from datasets_scripts.positive_scaling import generate_scaled_triplets

    ids = [f"g{i:02d}" for i in range(12)]
    corpus = _scaling_corpus(ids, [(i * 20, 0, 0) for i in range(12)])
    mapping = {i: f"caption of {i}" for i in ids} | {"g03": "  "}
    common = dict(rank_window=None, dataset="cirr", show_progress_bar=False)
    with pytest.raises(ValueError, match=r"empty caption for 1 of 12 images \(first: \['g03'\]\).*skip_empty_captions"):
        generate_scaled_triplets(corpus, ColumnCaptioner(mapping=mapping), tmp_path / "refused", **common)
    out = generate_scaled_triplets(corpus, ColumnCaptioner(mapping=mapping), tmp_path / "skipped",
                                   skip_empty_captions=True, **common).path
    triplets = datasets.load_dataset(str(out), "triplets", split="train").to_list()
    assert len(triplets) == 11 and all("g03" not in (t["reference_id"], t["target_id"]) for t in triplets)
    assert all(t.count("caption of g") == 2 for row in triplets for t in row["modification_texts"])  # both captions
    with pytest.raises(ValueError, match="k .* must be a positive integer, got 0"):
        generate_scaled_triplets(corpus, ColumnCaptioner(mapping=mapping), tmp_path / "k0", k=0, **common)
    assert not (tmp_path / "k0").exists()

    # The cache is keyed by each image's id and content: a changed image and a renamed middle id are captioned
    # again (only they are), never served the old caption.
    first = _PixelCaptioner()
    captions = caption_corpus(corpus, first, tmp_path / "cache", shard_size=4, show_progress_bar=False)
    assert sorted(first.seen) == ids and captions["g05"] == "a (100, 0, 0) square"
    colours = [(i * 20, 0, 0) for i in range(12)]
    colours[5] = (0, 0, 255)
    renamed = [("h06" if i == "g06" else i) for i in ids]
    again = _PixelCaptioner()
    captions = caption_corpus(_scaling_corpus(renamed, colours), again, tmp_path / "cache", shard_size=4,
                              show_progress_bar=False)
    assert sorted(again.seen) == ["g05", "h06"]
    assert captions["g05"] == "a (0, 0, 255) square" and captions["h06"] == "a (120, 0, 0) square"
    assert "g06" not in captions and len(captions) == 12


@pytest.mark.parametrize("pool", ["triplet_images", "corpus"])
def test_positive_scaling_pairs_within_triplet_images(fiq_root, tiny_vit_dir, tmp_path, monkeypatch, pool):
    import generate_triplets

    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("red dress\nblue shirt\n")
    out = tmp_path / f"gen_{pool}"
    # random pairs with k = pool size - 1: every pool image is every reference's target once
    generate_triplets.main([
        "--dataset", "fashioniq", "--data_dir", str(fiq_root), "--output_dir", str(out), "--captioner", "retrieval",
        "--encoder", str(tiny_vit_dir), "--phrases", str(phrases), "--random_pairs", "--targets_per_reference", "100",
        "--templates", "2", "--pool", pool, "--caption_cache_dir", str(tmp_path / f"caps_{pool}"),
    ])
    generated = datasets.load_dataset(str(out), "triplets", split="train")
    used = set(generated["reference_id"]) | set(generated["target_id"])
    in_triplets = {f"{p}{i}" for p in "DST" for i in range(4)}
    outside = {f"{p}{i}" for p in "DST" for i in (4, 5)}
    if pool == "triplet_images":
        assert used == in_triplets
    else:
        assert used == in_triplets | outside


@pytest.mark.parametrize(("old", "new"), [("--K", "--num_triplets"), ("--k", "--targets_per_reference")])
def test_the_originals_one_letter_options_are_errors_naming_the_new_names(old, new, capsys):
    """The original's --k (targets per reference) and --K (a subset of the triplets) differ only in case: here each
    has one spelled-out name, and the old one fails naming it instead of meaning something else."""
    import generate_triplets

    with pytest.raises(SystemExit) as stop:
        generate_triplets.main(["--dataset", "x", "--output_dir", "y", old, "3000"])
    assert stop.value.code == 2 and f"{old} is now {new}" in capsys.readouterr().err
    args = generate_triplets.build_parser().parse_args(["--dataset", "x", "--output_dir", "y", new, "7"])
    assert (args.num_triplets, args.targets_per_reference) == ((7, 1) if new == "--num_triplets" else (None, 7))


def test_num_triplets_keeps_a_random_subset_of_the_generated_triplets(fiq_root, tiny_vit_dir, tmp_path, monkeypatch):
    import generate_triplets

    monkeypatch.setenv("SPN4CIR_CACHE", str(tmp_path / "cache"))
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("red dress\nblue shirt\n")
    common = ["--dataset", "fashioniq", "--data_dir", str(fiq_root), "--captioner", "retrieval",
              "--encoder", str(tiny_vit_dir), "--phrases", str(phrases), "--random_pairs",
              "--caption_cache_dir", str(tmp_path / "caps")]
    generate_triplets.main(common + ["--output_dir", str(tmp_path / "all")])
    generate_triplets.main(common + ["--output_dir", str(tmp_path / "five"), "--num_triplets", "5"])
    every = datasets.load_dataset(str(tmp_path / "all"), "triplets", split="train")
    five = datasets.load_dataset(str(tmp_path / "five"), "triplets", split="train")
    pairs = set(zip(every["reference_id"], every["target_id"]))
    assert len(every) == 12 and len(five) == 5  # k=1: one per triplet image, then 5 of them
    assert set(zip(five["reference_id"], five["target_id"])) <= pairs
    corpus = datasets.load_dataset(str(tmp_path / "five"), "corpus", split="train")
    assert set(corpus["image_id"]) == set(five["reference_id"]) | set(five["target_id"])
    with pytest.raises(ValueError, match="num_triplets=13 but 12 triplets"):
        generate_triplets.main(common + ["--output_dir", str(tmp_path / "x"), "--num_triplets", "13"])


def test_column_captions_that_are_missing_are_named_not_written_as_none(tmp_path):
    """`generate_triplets.py --captioner column` on a column with missing captions: an error naming the images (it
    used to write "None instead of None"), or with --skip_empty_captions those images left out."""
    import io

    import generate_triplets

    from datasets_scripts.common import SplitData, write_cir_dataset

    def png(colour):
        buffer = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    captions = [f"a shade {i}" for i in range(6)]
    captions[2] = captions[4] = None
    rows = [{"image_id": f"p{i}", "image_bytes": png((40 * i, 0, 0)), "caption": c} for i, c in enumerate(captions)]
    corpus = write_cir_dataset(tmp_path / "corpus", {"train": SplitData(corpus=rows)}, corpus_only=True,
                               corpus_extra={"caption": datasets.Value("string")})
    argv = ["--dataset", str(corpus), "--pool", "corpus", "--captioner", "column", "--caption_column", "caption",
            "--random_pairs", "--targets_per_reference", "1", "--tokenizer", "none"]
    with pytest.raises(ValueError, match=r"empty caption for 2 of 6 images \(first: \['p2', 'p4'\]\).*the corpus "
                                         r"column 'caption' holds no caption for them.*--skip_empty_captions"):
        generate_triplets.main([*argv, "--output_dir", str(tmp_path / "refused")])
    generate_triplets.main([*argv, "--skip_empty_captions", "--output_dir", str(tmp_path / "out")])
    triplets = datasets.load_dataset(str(tmp_path / "out"), "triplets", split="train")
    assert len(triplets) == 4 and not {"p2", "p4"} & set(list(triplets["reference_id"]) + list(triplets["target_id"]))
    assert not any("None" in t for row in triplets["modification_texts"] for t in row)
