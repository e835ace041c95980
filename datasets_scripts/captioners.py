"""Captioners for SPN's positive scaling, behind one small interface:

    captioner(batch) -> list[str]

`batch` is a dict of columns for B images: `image` (PIL images) and, where the corpus has them, `image_id`,
`category`, ... Three implementations:
- `MLLMCaptioner`: a multimodal LLM (`AutoModelForImageTextToText` + `AutoProcessor`, e.g. LLaVA-1.5
  `llava-hf/llava-1.5-7b-hf` or Qwen2-VL) prompted like the paper, greedy decoding, the full answer (a word
  limit as an option);
- `RetrievalCaptioner`: zero-shot captioning with any image/text embedding model: the best phrases of a given
  vocabulary for each image (no generation model needed);
- `ColumnCaptioner`: captions that already exist (a corpus column or an id -> caption mapping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_spn4cir.storage import file_stamp, json_sha256, sha256

FASHIONIQ_PROMPT = "please briefly describe the {category} in {n} words"
IMAGE_PROMPT = "please briefly describe the image in {n} words"
ORIGINAL_PROMPT_PREFIX = "user: "  # captioner_llava.py: inp = f"user: {prompt}"
ORIGINAL_MAX_NEW_TOKENS = 1024


def limit_words(text: str, n: int) -> str:
    """The first `n` words of `text`, without trailing punctuation (captions feed templates)."""
    words = text.replace("\n", " ").split()
    return " ".join(words[:n]).strip(" .,;:!?")


def weights_identity(model_name_or_path: str, model) -> str:
    """What identifies a checkpoint's weights, cheaply: for a local directory, each weight file's size, mtime,
    ctime and inode (rewriting a file changes them; nothing is read); for a Hub id, the resolved commit."""
    path = Path(model_name_or_path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"))
        return sha256("|".join(file_stamp(f, f.name) for f in files).encode())[:16]
    return f"{model_name_or_path}@{getattr(model.config, '_commit_hash', None)}"


def load_mllm(model_name_or_path: str, device: str | torch.device = "cpu", dtype=None):
    """`(processor, model)` of a multimodal chat checkpoint (`AutoProcessor` + `AutoModelForImageTextToText`), the
    model in eval mode on `device`, the tokenizer padding on the left (batched generation continues every row at
    its end)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
    return processor, model


def generate_answers(model, processor, inputs, max_new_tokens: int) -> list[str]:
    """Greedy `generate` on a processed batch (`input_ids` `[B, L]`, left-padded, and the image tensors): the `B`
    answers, decoded without special tokens (not stripped)."""
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class MLLMCaptioner:
    """
    Caption images with a multimodal LLM, as the paper does with LLaVA (`zscir/captioner_llava.py`).

    Args:
        model_name_or_path: any `AutoModelForImageTextToText` checkpoint with a chat-template processor.
        prompt: `{n}` words, `{category}` (FashionIQ: `FASHIONIQ_PROMPT`; CIRR/CC: `IMAGE_PROMPT`).
        num_words: `n` in the prompt (the paper: 5 for FashionIQ, 10 for CIRR).
        max_new_tokens: generation budget; default 1024 (the original's), or `4 * word_limit + 4` with a limit.
        word_limit: `None` (the original) keeps the model's whole answer, only stripped of surrounding white
            space; an integer cuts it to that many words and strips trailing punctuation (`limit_words`).
        prompt_prefix: put before the prompt inside the user turn; `"user: "` is the original's form
            (`inp = f"user: {prompt}"` after the image token).
        device, dtype: where and how to run the model.

    Decoding is greedy (`do_sample=False`): deterministic, matching the paper's temperature 0.01 / top-p 0.01.
    The conversation template is the checkpoint's own chat template (the original used LLaVA's `llava_v1`).
    """

    def __init__(self, model_name_or_path: str, prompt: str = IMAGE_PROMPT, num_words: int = 10,
                 max_new_tokens: int | None = None, device: str | torch.device = "cpu", dtype=None,
                 word_limit: int | None = None, prompt_prefix: str = ORIGINAL_PROMPT_PREFIX):
        self.processor, self.model = load_mllm(model_name_or_path, device, dtype)
        self.prompt, self.num_words, self.word_limit, self.prompt_prefix = prompt, num_words, word_limit, prompt_prefix
        self.max_new_tokens = max_new_tokens or (4 * word_limit + 4 if word_limit else ORIGINAL_MAX_NEW_TOKENS)
        self.weights = weights_identity(model_name_or_path, self.model)

    def prompt_for(self, category: str | None) -> str:
        return self.prompt_prefix + self.prompt.format(n=self.num_words, category=category or "image")

    def __call__(self, batch: dict) -> list[str]:
        images = batch["image"]
        categories = batch.get("category") or [None] * len(images)
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt_for(c)}]}],
                add_generation_prompt=True,
            )
            for c in categories
        ]
        inputs = self.processor(images=[im.convert("RGB") for im in images], text=texts, padding=True,
                                return_tensors="pt").to(self.model.device)
        decoded = generate_answers(self.model, self.processor, inputs, self.max_new_tokens)
        if self.word_limit is None:
            return [text.strip() for text in decoded]
        return [limit_words(text, self.word_limit) for text in decoded]


class EmbeddingAdapter:
    """Image and text embeddings from a CIR model (`get_target_embeds` + `get_text_features`) or a
    `transformers.CLIPModel` (`get_image_features` / `get_text_features`), L2-normalized."""

    def __init__(self, model, image_processor, tokenizer, max_length: int | None = None):
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.max_length = max_length

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode_images(self, images) -> torch.Tensor:
        """PIL images -> `[B, D]` L2-normalized embeddings."""
        return self.encode_pixels(self.image_processor(images, return_tensors="pt")["pixel_values"])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixel_values` `[B, 3, S, S]` -> `[B, D]` L2-normalized embeddings (a CIR model's target embeddings)."""
        pixels = pixels.to(self.device)
        if hasattr(self.model, "get_target_embeds"):
            return self.model.get_target_embeds(pixels).float().cpu()
        out = self.model.get_image_features(pixel_values=pixels)
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1).cpu()


class RetrievalCaptioner:
    """
    Zero-shot captioning by retrieval: each image gets the `top_k` phrases of `phrases` whose text embeddings
    are most similar to its image embedding, joined by `separator` (best first).

    Args:
        encoder: an object with `encode_images(images) -> [B, D]` and `encode_texts(texts) -> [P, D]`
            (L2-normalized), e.g. `EmbeddingAdapter(model, image_processor, tokenizer)`.
        phrases: the vocabulary (encoded once).
        top_k: phrases per caption.
        min_relative_score: drop phrases scoring below this fraction of the best one (keeps captions short when
            one phrase dominates); None keeps all `top_k`.
    """

    def __init__(self, encoder, phrases: Sequence[str], top_k: int = 1, separator: str = " and ",
                 min_relative_score: float | None = None, batch_size: int = 256):
        if not phrases:
            raise ValueError("RetrievalCaptioner needs a non-empty phrase vocabulary.")
        self.encoder, self.phrases = encoder, list(phrases)
        self.top_k, self.separator = min(top_k, len(self.phrases)), separator
        self.min_relative_score = min_relative_score
        self.phrase_embeds = torch.cat([encoder.encode_texts(self.phrases[i:i + batch_size])
                                        for i in range(0, len(self.phrases), batch_size)])
        # which encoder: its phrase embeddings (any change of its text side changes them), for the caption cache
        self.weights = sha256(self.phrase_embeds.float().contiguous().numpy().tobytes())[:16]

    def __call__(self, batch: dict) -> list[str]:
        scores = self.encoder.encode_images(batch["image"]) @ self.phrase_embeds.T
        values, indices = scores.topk(self.top_k, dim=1)
        captions = []
        for vals, idx in zip(values.tolist(), indices.tolist()):
            keep = [i for v, i in zip(vals, idx)
                    if self.min_relative_score is None or v >= self.min_relative_score * vals[0]]
            captions.append(self.separator.join(self.phrases[i] for i in keep))
        return captions


class ColumnCaptioner:
    """Existing captions: a column of the corpus (`column`) or a mapping `{image_id: caption}`."""

    def __init__(self, column: str | None = None, mapping: dict[str, str] | None = None):
        if (column is None) == (mapping is None):
            raise ValueError("Pass exactly one of `column` or `mapping`.")
        self.column, self.mapping = column, mapping
        if mapping is not None:  # which captions, for the caption cache
            self.weights = json_sha256(mapping)[:16]

    @property
    def empty_caption_fix(self) -> str:
        """What to do about images without a caption (`positive_scaling.caption_images`' error)."""
        source = f"the corpus column {self.column!r}" if self.column is not None else "the caption mapping"
        return f"{source} holds no caption for them (null or empty): fill them in"

    def __call__(self, batch: dict) -> list[str]:
        if self.column is not None:
            if self.column not in batch:
                raise KeyError(f"The corpus has no column {self.column!r} to take captions from.")
            return [_caption_text(c) for c in batch[self.column]]
        missing = [i for i in batch["image_id"] if i not in self.mapping]
        if missing:
            raise KeyError(f"No caption for {len(missing)} images (first: {missing[:5]}).")
        return [_caption_text(self.mapping[i]) for i in batch["image_id"]]


def _caption_text(value) -> str:
    """A stored caption as text; a missing one (None, NaN from a table) is empty, so it is named, never "None"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
