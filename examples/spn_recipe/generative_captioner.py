"""A generative captioner standing in for the paper's MLLM (LLaVA): a tiny LLaVA built from transformers parts.

SPN captions its training images with LLaVA, a model trained on other data. The embedded default stands in for
that with a tiny `LlavaForConditionalGeneration` (a CLIP vision tower + a Llama decoder, built from configs) and a
`LlavaProcessor` (word-level tokenizer with an `<image>` token and a chat template), trained here only on the
benchmark's separate captioned `pretrain` corpus, never on the scene graph of the pool it captions. It is saved like
a Hub checkpoint and then used through `datasets_scripts.captioners.MLLMCaptioner`: `AutoProcessor`, the chat
template, `AutoModelForImageTextToText.generate` — the code path a real LLaVA / Qwen-VL takes.

Its size and training budget were chosen by caption quality on held-out `pretrain` captions (the last `heldout`
images, never trained on), before any ablation was looked at:
`PYTHONPATH=examples python -m spn_recipe.generative_captioner --benchmark DIR` prints that comparison
(docs/reproduction.md: the captioner).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from datasets_scripts.captioners import IMAGE_PROMPT, ORIGINAL_PROMPT_PREFIX, MLLMCaptioner
from modeling_spn4cir.cli import add_debug_flag, run_cli
from modeling_spn4cir.storage import apply_umask

from .minibatch import train_minibatches
from .stamps import store_summary, stored_summary

# The chat template of the stand-in ("user: <image> ... assistant: "), in the form real LLaVA processors ship.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
NUM_WORDS = 10  # the prompt's `{n}` (the paper's CIRR setting)
MAX_NEW_TOKENS = 40  # a caption of 4 objects is 19 tokens; the original's 1024 only costs time here
# What MLLMCaptioner.prompt_for writes with the defaults: "user: please briefly describe the image in 10 words".
PROMPT = ORIGINAL_PROMPT_PREFIX + IMAGE_PROMPT.format(n=NUM_WORDS, category="image")


@dataclass
class CaptionerConfig:
    """Size and training budget of the stand-in (chosen on held-out `pretrain` captions, see the module doc)."""

    hidden: int = 64
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    patch: int = 16
    image_size: int = 64
    epochs: int = 20
    learning_rate: float = 1e-3
    batch_size: int = 64
    heldout: int = 500  # the last `heldout` pretrain images: never trained on, they score the captioner


def _word_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no space before punctuation
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def build_captioner(captions: list[str], cfg: CaptionerConfig, seed: int = 0):
    """A randomly initialized tiny LLaVA and its processor; the vocabulary is the training captions' words plus
    the prompt's and the chat template's."""
    tokenizer = _word_tokenizer(list(captions) + [PROMPT, "user : assistant :"])
    processor = llava_processor(tokenizer, cfg)
    return tiny_llava(tokenizer, cfg, (cfg.image_size // cfg.patch) ** 2 + 32 + MAX_NEW_TOKENS, seed), processor


def llava_processor(tokenizer, cfg):
    """A `LlavaProcessor` of `cfg`'s image size and patch, with the chat template of the stand-ins (any number of
    images per turn)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = cfg.image_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=cfg.patch, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )


def tiny_llava(tokenizer, cfg, max_positions: int, seed: int = 0):
    """A randomly initialized `LlavaForConditionalGeneration` of `cfg`'s sizes (a CLIP vision tower + a Llama
    decoder of `max_positions` positions), generating with `tokenizer`'s special tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
                           image_size=cfg.image_size, patch_size=cfg.patch, projection_dim=cfg.hidden),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=cfg.hidden,
                         intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=max_positions,
                         pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]),
        image_token_index=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.bos_token_id = ids["<s>"]
    return model


def _prompt_ids(processor, image) -> list[int]:
    """The token ids MLLMCaptioner sends before the answer (chat template, image tokens expanded)."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()


def train_captioner(model, processor, images, captions: list[str], cfg: CaptionerConfig, seed: int = 0,
                    show_progress_bar: bool = True) -> list[float]:
    """Teacher-forced next-token loss on the answer (`caption </s>`) after the captioner's prompt; AdamW with a
    linear decay, seeded shuffling. Returns the per-step losses."""
    prompt = torch.tensor(_prompt_ids(processor, images[0]))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return train_answers(model, processor, prompt, pixels, captions, cfg, seed, "Captioner: training on 'pretrain'",
                         show_progress_bar)


def train_answers(model, processor, prompt: torch.Tensor, pixels: torch.Tensor, answers: list[str], cfg, seed: int,
                  desc: str, show_progress_bar: bool = True) -> list[float]:
    """Teacher-forced next-token loss on each `answer </s>` after the same `prompt` (token ids, image tokens
    expanded), the example's images `pixels[i]` (`[N, 3, S, S]`, or `[N, k, 3, S, S]` for k images per prompt);
    AdamW with a linear decay, seeded shuffling. Returns the per-step losses."""
    tokenizer = processor.tokenizer
    answers = [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
    length = len(prompt) + max(len(a) for a in answers)
    input_ids = torch.full((len(answers), length), tokenizer.pad_token_id)
    labels = torch.full((len(answers), length), -100)
    attention = torch.zeros((len(answers), length), dtype=torch.long)
    for i, a in enumerate(answers):
        end = len(prompt) + len(a)
        input_ids[i, :len(prompt)], input_ids[i, len(prompt):end] = prompt, torch.tensor(a)
        labels[i, len(prompt):end] = torch.tensor(a)
        attention[i, :end] = 1

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        width = int(attention[idx].sum(1).max())  # drop the columns that are padding for the whole batch
        images = pixels[idx] if pixels.dim() == 4 else pixels[idx].flatten(0, 1)  # each prompt's images in order
        return model(input_ids=input_ids[idx, :width], attention_mask=attention[idx, :width],
                     pixel_values=images, labels=labels[idx, :width]).loss

    return train_minibatches(model, len(answers), cfg.batch_size, cfg.epochs, cfg.learning_rate, seed, batch_loss,
                             desc, show_progress_bar)


_SPLIT = re.compile(r"\s*,\s*|\s+and\s+")


def caption_phrases(caption: str) -> list[str]:
    """The object phrases of a caption: split at commas and "and", without a leading article
    ("a small red circle, a large blue cross" and "small red circle and large blue cross" give the same two)."""
    phrases = [p.strip() for p in _SPLIT.split(caption.strip().lower())]
    return [re.sub(r"^(a|an|the)\s+", "", p) for p in phrases if p]


def caption_precision(captions: list[str], scenes: list[str]) -> dict[str, float]:
    """Of all phrases of `captions`, the % that name an object of the image's scene (`scenes`: the scene-graph
    JSON) exactly (size, colour, shape) and by colour + shape; and the % of scene objects named exactly (recall).
    A caption with no phrase counts as one wrong phrase."""
    exact = colour_shape = total = named = objects_total = 0
    for caption, scene in zip(captions, scenes, strict=True):
        objects = json.loads(scene)
        full = {f"{o['size']} {o['colour']} {o['shape']}" for o in objects}
        partial = {f"{o['colour']} {o['shape']}" for o in objects}
        phrases = caption_phrases(caption) or [""]
        total += len(phrases)
        exact += sum(p in full for p in phrases)
        colour_shape += sum(" ".join(p.split()[-2:]) in partial for p in phrases)
        named += len(full & set(phrases))
        objects_total += len(full)
    return {"phrase_precision": 100 * exact / max(total, 1),
            "colour_shape_precision": 100 * colour_shape / max(total, 1),
            "object_recall": 100 * named / max(objects_total, 1), "phrases": total}


def train_generative_captioner(pretrain, output_dir: str | Path, cfg: CaptionerConfig | None = None, seed: int = 0,
                               show_progress_bar: bool = True) -> dict:
    """Train the stand-in on `pretrain` minus its last `cfg.heldout` images, save it (model + processor) to
    `output_dir`, and score it through `MLLMCaptioner` on the held-out images. Reuses a finished checkpoint of
    the same config, seed and data. Returns `{"path", "heldout", "config", "seconds"}`."""
    cfg = cfg or CaptionerConfig()
    output_dir = Path(output_dir)
    n_train = len(pretrain) - cfg.heldout
    if n_train < cfg.batch_size:
        raise ValueError(f"The pretrain corpus has {len(pretrain)} images; the captioner needs more than "
                         f"heldout ({cfg.heldout}) + batch_size ({cfg.batch_size}).")
    manifest = {"config": asdict(cfg), "seed": seed, "images": len(pretrain),
                "first_ids": pretrain["image_id"][:3], "last_ids": pretrain["image_id"][-3:]}
    stamp = output_dir / "captioner_manifest.json"
    done = stored_summary(stamp, manifest)
    if done is not None:
        return done
    start = time.perf_counter()
    train_rows = pretrain.select(range(n_train))
    captions = list(train_rows["caption"])
    model, processor = build_captioner(captions, cfg, seed)
    losses = train_captioner(model, processor, list(train_rows["image"]), captions, cfg, seed, show_progress_bar)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    apply_umask(output_dir)
    trained = time.perf_counter() - start
    heldout = pretrain.select(range(n_train, len(pretrain)))
    captioner = load_captioner(output_dir)
    predicted = []
    for i in range(0, len(heldout), 100):
        predicted += captioner({"image": heldout[i:i + 100]["image"]})
    quality = caption_precision(predicted, list(heldout["scene"]))
    summary = {"path": str(output_dir), "heldout": quality, "config": asdict(cfg),
               "parameters": sum(p.numel() for p in model.parameters()), "final_loss": losses[-1],
               "train_seconds": round(trained, 1), "seconds": round(time.perf_counter() - start, 1),
               "examples": [{"caption": c, "truth": t} for c, t in zip(predicted[:3], heldout["caption"][:3])]}
    store_summary(stamp, manifest, summary)
    return summary


def load_captioner(path: str | Path) -> MLLMCaptioner:
    """The trained stand-in behind the MLLM captioner interface (the paper's prompt with n=10, greedy decoding,
    the whole answer; `max_new_tokens` bounded, as a caption here is at most 19 tokens)."""
    return MLLMCaptioner(str(path), prompt=IMAGE_PROMPT, num_words=NUM_WORDS, max_new_tokens=MAX_NEW_TOKENS)


SWEEP = {  # the selection candidates (docs/reproduction.md); "width 64, 20 epochs" is the default
    "width 64, 3 epochs": dict(epochs=3),
    "width 64, 20 epochs": dict(epochs=20),
    "width 128, 10 epochs": dict(hidden=128, epochs=10),
    "width 64, patch 8, 20 epochs": dict(patch=8, epochs=20),
}


def main(argv=None):
    import argparse

    import datasets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, help="a synthetic benchmark dir (datasets_scripts.synthetic)")
    parser.add_argument("--output_dir", default="outputs/captioner_selection")
    parser.add_argument("--candidates", nargs="*", default=list(SWEEP), choices=list(SWEEP))
    parser.add_argument("--seed", type=int, default=0)
    args = add_debug_flag(parser).parse_args(argv)
    pretrain = datasets.load_dataset(args.benchmark, "corpus", split="pretrain")
    rows = {}
    for name in args.candidates:
        cfg = CaptionerConfig(**SWEEP[name])
        summary = train_generative_captioner(pretrain, Path(args.output_dir) / re.sub(r"\W+", "_", name), cfg,
                                             args.seed, show_progress_bar=False)
        rows[name] = summary
        q = summary["heldout"]
        print(f"{name}: held-out exact {q['phrase_precision']:.1f}%, colour+shape {q['colour_shape_precision']:.1f}%,"
              f" recall {q['object_recall']:.1f}%, {summary['parameters'] / 1e6:.2f}M parameters, "
              f"{summary['seconds']:.0f} s", flush=True)
    from modeling_spn4cir.storage import atomic_write_json

    atomic_write_json(Path(args.output_dir) / "selection.json", rows, indent=2)


if __name__ == "__main__":
    run_cli(main)
