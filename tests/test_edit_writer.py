"""The edit writer: an MLLM that sees the reference and the target image in one chat turn writes the modification
text. Tiny multi-image models built from configs (LLaVA, Idefics3) run through the real AutoProcessor / chat
template / generate path; the edit cache resumes after a kill and splits over a launcher's processes."""

import datasets
import pytest
import torch
from conftest import save_tiny_llava, solid_images

from datasets_scripts.edit_writer import EDIT_PROMPT, MLLMEditWriter, TwoImageError, write_edits

WORDS = ("the first image is reference second target in one sentence say how to change into make it red blue "
         "green bigger smaller").split()


def save_tiny_idefics3(path):
    """A randomly initialized Idefics3 (tiny SigLIP-like vision tower + Llama, 4 image tokens per 32-pixel image,
    no image splitting) with a word-level tokenizer and a chat template, saved like a Hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    special = ["<pad>", "<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
               "<global-img>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance> {% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                  max_image_size={"longest_edge": 32}),
        tokenizer=tokenizer, image_seq_len=4, chat_template=template)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=0)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llava_pairs(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava_pairs"), WORDS)


def _recorded(editor):
    """Record every batch the editor's model is asked to generate from."""
    seen = []
    generate = editor.model.generate
    editor.model.generate = lambda **inputs: seen.append(inputs) or generate(**inputs)
    return seen


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_each_prompt_carries_both_images_reference_first(family, tiny_llava_pairs, tmp_path):
    path = tiny_llava_pairs if family == "llava" else save_tiny_idefics3(tmp_path / "idefics3")
    editor = MLLMEditWriter(str(path), max_new_tokens=6)
    assert editor.prompt == EDIT_PROMPT
    seen = _recorded(editor)
    references, targets = solid_images(3, size=32, seed=1), solid_images(3, size=32, seed=2)
    texts = editor({"reference_image": references, "target_image": targets, "reference_id": ["a", "b", "c"],
                    "target_id": ["d", "e", "f"]})
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    (inputs,) = seen
    processor = editor.processor
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_image = 16 if family == "llava" else 4  # LLaVA: 16 patches; Idefics3: image_seq_len
    assert (inputs["input_ids"] == image_token).sum(dim=1).tolist() == [2 * per_image] * 3
    prompt = processor.tokenizer(EDIT_PROMPT, add_special_tokens=False)["input_ids"]
    for row in inputs["input_ids"].tolist():  # the prompt follows both images
        after = row[len(row) - row[::-1].index(image_token):]
        assert any(after[i:i + len(prompt)] == prompt for i in range(len(after)))
    single = processor.image_processor(references[:1] + targets[:1], return_tensors="pt")["pixel_values"]
    if family == "llava":  # one pixel tensor per image: pair i is rows 2i (reference) and 2i + 1 (target)
        assert inputs["pixel_values"].shape[0] == 6
        assert torch.equal(inputs["pixel_values"][:2], single)
    else:  # one row per pair, its two images (reference, target)
        assert inputs["pixel_values"].shape[:2] == (3, 2)
        assert torch.equal(inputs["pixel_values"][0], single.reshape(2, *single.shape[-3:]))
    assert editor({"reference_image": references, "target_image": targets, "reference_id": ["a", "b", "c"],
                   "target_id": ["d", "e", "f"]}) == texts  # greedy: deterministic


def test_a_model_that_cannot_take_two_images_is_an_error_naming_it(tmp_path):
    one_image = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "{% if loop.first %}<image> {% endif %}{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
    path = save_tiny_llava(tmp_path / "one_image", WORDS, template=one_image)
    with pytest.raises(TwoImageError, match=rf"{path} cannot write modification texts from two images: its chat "
                                            r"template renders 1 image placeholder.*'<image>'.*two images into one "
                                            r"user turn.*Qwen2-VL"):
        MLLMEditWriter(str(path))
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import tiny_tokenizer

    text_only = tmp_path / "text_only"
    tokenizer = tiny_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(text_only)
    tokenizer.save_pretrained(text_only)
    with pytest.raises(TwoImageError, match=rf"{text_only} cannot write modification texts from two images: it does "
                                            "not load as one.*AutoModelForImageTextToText"):
        MLLMEditWriter(str(text_only))


# ----------------------------------------------------------------------------------------------- the cache
def _corpus(n):
    return datasets.Dataset.from_dict({"image_id": [f"g{i}" for i in range(n)], "image": solid_images(n, size=16)},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


class _Editor:
    """A stand-in edit writer: 'edit r -> t' for each pair; records the pairs it writes, fails on call `fail_on`."""

    def __init__(self, prompt="p", fail_on=None):
        self.prompt, self.fail_on, self.calls, self.written = prompt, fail_on, 0, []

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("killed")
        assert len(batch["reference_image"]) == len(batch["target_image"]) == len(batch["reference_id"])
        self.written += list(zip(batch["reference_id"], batch["target_id"]))
        return [f"edit {r} -> {t}" for r, t in zip(batch["reference_id"], batch["target_id"])]


PAIRS = [(f"g{i}", f"g{(i + 3) % 10}") for i in range(9)]  # shard size 2: shards of 2, 2, 2, 2 and 1 pairs


def test_the_cache_resumes_after_a_kill_writing_only_the_missing_pairs(tmp_path):
    corpus = _corpus(10)
    with pytest.raises(RuntimeError, match="killed"):  # killed in shard 2 (calls 1-4 finished shards 0 and 1)
        write_edits(corpus, PAIRS, _Editor(fail_on=5), tmp_path / "edits", shard_size=2, batch_size=1,
                    show_progress_bar=False)
    assert sorted(p.name for p in (tmp_path / "edits").glob("edits-*.jsonl")) == ["edits-00000.jsonl",
                                                                                 "edits-00001.jsonl"]
    resumed = _Editor()
    texts = write_edits(corpus, PAIRS, resumed, tmp_path / "edits", shard_size=2, batch_size=1, show_progress_bar=False)
    assert resumed.written == PAIRS[4:]  # only the pairs of the unfinished shards
    assert texts == [f"edit {r} -> {t}" for r, t in PAIRS]
    again = _Editor()
    assert write_edits(corpus, PAIRS, again, tmp_path / "edits", shard_size=2, show_progress_bar=False) == texts
    assert again.written == []
    # a changed image: only the pairs that use it are written again
    changed = corpus.map(lambda row: {"image": solid_images(1, size=16, seed=9)[0] if row["image_id"] == "g5"
                                      else row["image"]}, features=corpus.features)
    rewritten = _Editor()
    write_edits(changed, PAIRS, rewritten, tmp_path / "edits", shard_size=2, show_progress_bar=False)
    assert rewritten.written == [("g2", "g5"), ("g5", "g8")]
    with pytest.raises(ValueError, match=r"edits holds modification texts of another run \(editor differ\)"):
        write_edits(corpus, PAIRS, _Editor(prompt="another prompt"), tmp_path / "edits", shard_size=2)


def test_the_pairs_split_over_processes_without_a_group(tmp_path, monkeypatch):
    corpus = _corpus(10)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = _Editor()
    with pytest.raises(RuntimeError, match=r"Edit shards \[1, 3\] are missing.*run again to resume"):
        write_edits(corpus, PAIRS, first, tmp_path, shard_size=2, show_progress_bar=False)
    assert first.written == PAIRS[0:2] + PAIRS[4:6] + PAIRS[8:9]  # shards 0, 2 and 4
    monkeypatch.setenv("RANK", "1")
    second = _Editor()
    texts = write_edits(corpus, PAIRS, second, tmp_path, shard_size=2, show_progress_bar=False)
    assert second.written == PAIRS[2:4] + PAIRS[6:8]
    assert texts == [f"edit {r} -> {t}" for r, t in PAIRS]


def test_the_cache_key_holds_the_prompt_and_the_weights(tmp_path):
    from datasets_scripts.captioning import captioner_key

    path = save_tiny_llava(tmp_path / "editor", WORDS)
    base = captioner_key(MLLMEditWriter(str(path)))
    assert captioner_key(MLLMEditWriter(str(path))) == base and EDIT_PROMPT in base
    assert captioner_key(MLLMEditWriter(str(path), prompt="Say what changes.")) != base
    save_tiny_llava(path, WORDS, seed=1)  # retrained in place
    assert captioner_key(MLLMEditWriter(str(path))) != base


# ------------------------------------------------------------------------------------- generate_triplets.py
def test_generate_triplets_writes_the_editors_texts_into_the_dataset(tiny_llava_pairs, tmp_path):
    import generate_triplets

    from datasets_scripts.images import build_images

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(solid_images(6, size=32, seed=4)):
        image.save(photos / f"p{i}.png")
    corpus_dir = build_images(photos, tmp_path / "corpus")
    out, cache = tmp_path / "scaled", tmp_path / "edits"
    argv = ["--dataset", str(corpus_dir), "--pool", "corpus", "--random_pairs", "--texts", "mllm_pairs",
            "--editor", str(tiny_llava_pairs), "--edit_max_new_tokens", "5", "--batch_size", "1",
            "--edit_cache_dir", str(cache), "--output_dir", str(out)]
    with pytest.raises(SystemExit, match="--texts mllm_pairs needs --editor"):
        generate_triplets.main([a for a in argv if a not in ("--editor", str(tiny_llava_pairs))])
    generate_triplets.main(argv)
    triplets = datasets.load_dataset(str(out), "triplets", split="train")
    written_corpus = datasets.load_dataset(str(out), "corpus", split="train")
    images = dict(zip(written_corpus["image_id"], written_corpus["image"]))
    editor = MLLMEditWriter(str(tiny_llava_pairs), max_new_tokens=5)
    assert len(triplets) == 6 and set(triplets["reference_caption"]) == {None}
    for row in triplets:
        written = editor({"reference_image": [images[row["reference_id"]]], "target_image": [images[row["target_id"]]],
                          "reference_id": [row["reference_id"]], "target_id": [row["target_id"]]})
        assert row["modification_texts"] == written and written[0]
    assert f"written from both images by `{tiny_llava_pairs}`" in (out / "README.md").read_text()
    assert len(list(cache.glob("edits-*.jsonl"))) == 1
