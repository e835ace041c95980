"""Modification texts written by a multimodal LLM that sees both images of a pair, instead of templates over two
captions (as MegaPairs / BGE-VL, CoVR and MagicLens build their data).

    editor(batch) -> list[str]

`batch` holds B pairs: `reference_image`, `target_image` (PIL images) and `reference_id`, `target_id`.
`MLLMEditWriter` puts both images into one user turn of the checkpoint's own chat template (two image entries,
then the prompt), generates greedily in batches and keeps the whole answer, stripped. Any
`AutoModelForImageTextToText` checkpoint whose chat template takes two images in one turn works: LLaVA-1.5 /
LLaVA-OneVision, Qwen2-VL, Idefics3; a model that cannot is an error naming it and what is needed.

`write_edits` runs an edit writer over pairs of a corpus with the caption cache's machinery
(`datasets_scripts.captioning`): JSON-lines shards in a [`ShardStore`] (`edits-00000.jsonl` ...), each text keyed
by the two images' ids and the sha256 of their bytes, the cache's `edits_manifest.json` recording the editor (its
class, prompt, generation budget and weights' identity) and the shard size; a restarted run generates only the
pairs of unfinished shards, and the shards are split across processes as the captions are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from modeling_spn4cir.distributed import world
from modeling_spn4cir.image_blocks import image_blocks
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.storage import RecordsCodec, ShardJob, ShardPlan, ShardStore

from .captioners import generate_answers, load_mllm, weights_identity
from .captioning import captioner_key, claim_cache, sync_records

EDIT_PROMPT = ("The first image is the reference, the second the target. In one sentence, say how to change the "
               "first image into the second.")
EDIT_MAX_NEW_TOKENS = 64  # one sentence
EDIT_MANIFEST = "edits_manifest.json"
EDIT_CACHE_FORMAT = 1
TWO_IMAGE_MODELS = ("e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf, "
                    "Qwen/Qwen2-VL-7B-Instruct, HuggingFaceM4/Idefics3-8B-Llama3")


class TwoImageError(ValueError):
    """A checkpoint that cannot take two images in one chat turn; the message names it and what is needed."""


def _cannot(model_name_or_path: str, why: str) -> TwoImageError:
    return TwoImageError(
        f"{model_name_or_path} cannot write modification texts from two images: {why}. The edit writer needs an "
        "image-text-to-text checkpoint (AutoModelForImageTextToText) whose processor has an image token and whose "
        f"chat template puts two images into one user turn ({TWO_IMAGE_MODELS}); or keep the templates "
        "(--texts templates)."
    )


class MLLMEditWriter:
    """
    Write the modification from a reference to a target image with a multimodal LLM that sees both.

    Args:
        model_name_or_path: an `AutoModelForImageTextToText` checkpoint whose chat template accepts two images in
            one user turn.
        prompt: the text after the two images (default `EDIT_PROMPT`; the first image is the reference).
        max_new_tokens: generation budget of one text.
        device, dtype: where and how to run the model.

    Decoding is greedy; the answer is kept whole, stripped of surrounding white space.
    """

    def __init__(self, model_name_or_path: str, prompt: str = EDIT_PROMPT,
                 max_new_tokens: int = EDIT_MAX_NEW_TOKENS, device: str | torch.device = "cpu", dtype=None):
        try:
            self.processor, self.model = load_mllm(model_name_or_path, device, dtype)
        except (ValueError, KeyError, AttributeError) as error:  # not a multimodal chat checkpoint
            raise _cannot(model_name_or_path, f"it does not load as one ({type(error).__name__}: {error})") from error
        self.name, self.prompt, self.max_new_tokens = model_name_or_path, prompt, max_new_tokens
        self.weights = weights_identity(model_name_or_path, self.model)
        self.chat_text = self._two_image_turn()

    def _two_image_turn(self) -> str:
        """The chat-template text of one user turn with two images and the prompt; a template that does not render
        both images (none, one, or no image token) is a [`TwoImageError`]."""
        image_token = getattr(self.processor, "image_token", None)
        if not image_token:
            raise _cannot(self.name, f"its processor ({type(self.processor).__name__}) has no image token")
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": self.prompt}]}]
        try:
            text = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        except (ValueError, TypeError) as error:  # no chat template, or one that refuses the turn
            raise _cannot(self.name, f"its chat template does not render the turn ({error})") from error
        count = text.count(image_token)
        if count != 2:
            raise _cannot(self.name, f"its chat template renders {count} image placeholder(s) {image_token!r} for a "
                                     "turn with two images")
        return text

    def inputs(self, batch: dict):
        """The processor's batch for B pairs: `input_ids` `[B, L]` (left-padded; two images' placeholders in each
        row) and the image tensors of the 2B images, reference then target per row, on the model's device."""
        pairs = [[_rgb(r), _rgb(t)] for r, t in zip(batch["reference_image"], batch["target_image"], strict=True)]
        return self.processor(images=pairs, text=[self.chat_text] * len(pairs), padding=True,
                              return_tensors="pt").to(self.model.device)

    def __call__(self, batch: dict) -> list[str]:
        answers = generate_answers(self.model, self.processor, self.inputs(batch), self.max_new_tokens)
        return [text.strip() for text in answers]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _pair_key(record: dict) -> tuple:
    return record.get("reference_id"), record.get("target_id"), record.get("reference_sha256"), \
        record.get("target_sha256")


def _writer(images: ImageStore, editor, pairs: list[tuple[str, str]], batch_size: int, bar):
    """`build` of an edit shard: the texts still valid in the shard it replaces (same ids, same bytes) are kept,
    the other pairs are written in batches."""
    def write(job: ShardJob) -> list[dict]:
        digests = job.plan.inputs["image_digests"]  # two per pair: reference, target
        keys = [(r, t, digests[2 * n], digests[2 * n + 1])
                for n, (r, t) in enumerate(pairs[job.plan.start:job.plan.stop])]
        done = {_pair_key(r): r["text"] for r in job.previous() or [] if r.get("text") is not None}
        todo = [key for key in dict.fromkeys(keys) if key not in done]
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            references, targets = [k[0] for k in batch], [k[1] for k in batch]
            texts = editor({"reference_image": images.images(references), "target_image": images.images(targets),
                            "reference_id": references, "target_id": targets})
            if len(texts) != len(batch):
                raise RuntimeError(f"The edit writer returned {len(texts)} texts for {len(batch)} pairs.")
            done.update(zip(batch, texts))
            bar.update(len(batch))
        return [{"reference_id": r, "target_id": t, "reference_sha256": rd, "target_sha256": td,
                 "text": done[(r, t, rd, td)]} for r, t, rd, td in keys]

    return write


def write_edits(corpus, pairs: Sequence[tuple[str, str]], editor, cache_dir: str | Path, shard_size: int = 1000,
                batch_size: int = 16, show_progress_bar: bool = True) -> list[str]:
    """The text `editor` writes for each `(reference_id, target_id)` of `pairs` (images of `corpus`), in order,
    resuming from the shards in `cache_dir` (see the module docstring)."""
    cache_dir = Path(cache_dir)
    pairs = [(str(r), str(t)) for r, t in pairs]
    images = ImageStore(corpus)
    images.check([i for pair in pairs for i in pair], "images of the pairs")
    settings = {"format": EDIT_CACHE_FORMAT, "shard_size": shard_size, "editor": captioner_key(editor)}
    claim_cache(cache_dir, settings, EDIT_MANIFEST, "modification texts")
    store = ShardStore(cache_dir, "edits", RecordsCodec(), "edit cache")
    flat = [i for pair in pairs for i in pair]

    def plan(only):
        ranges = store.blocks(len(pairs), shard_size)
        manifests = store.manifests(len(ranges))
        blocks = image_blocks(images, flat, [(2 * a, 2 * b) for a, b in ranges], manifests, only)
        plans = [None if block is None else ShardPlan(a, b, {**settings, "shard": k, **block.identity()}, block.inputs)
                 for k, ((a, b), block) in enumerate(zip(ranges, blocks))]
        return plans, manifests

    with tqdm(desc=f"Writing modification texts (rank {world(from_env=True)[0]})", unit="pair",
              disable=not show_progress_bar) as bar:
        records = sync_records(store, len(pairs), shard_size, settings, plan,
                               _writer(images, editor, pairs, batch_size, bar), "Edit")
    return [r["text"] for r in records]
