"""A two-image edit writer standing in for the multimodal LLMs that write a pair's modification text from both
images (MegaPairs / BGE-VL, CoVR, MagicLens): a tiny LLaVA built like the captioner (`generative_captioner`), trained
here only on pairs of `pretrain` images — never a train, pool or test image — whose texts are the synthetic world's
own modification grammar applied to the pair (`datasets_scripts.synthetic_edits`: "remove the red circle and add a
small blue square at the top"). It is saved like a Hub checkpoint and used through
`datasets_scripts.edit_writer.MLLMEditWriter`: `AutoProcessor`, the chat template with two images in one user turn
and the default prompt, `generate` — the code path a real LLaVA-OneVision / Qwen2-VL takes.

Its held-out quality is scored on pairs of the last `heldout` pretrain images (never trained on): of the clauses it
writes, the share that are clauses of the true modification, and the share of the true clauses it writes.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from datasets_scripts.captioners import weights_identity
from datasets_scripts.edit_writer import EDIT_PROMPT, MLLMEditWriter
from datasets_scripts.synthetic_edits import (
    describe_difference,
    difference,
    edit_scores,
    scene_from_json,
)

from .generative_captioner import (
    _word_tokenizer,
    llava_processor,
    tiny_llava,
    train_answers,
)
from .stamps import store_summary, stored_summary

CHAT_WORDS = "user : assistant :"


@dataclass
class EditorConfig:
    """Size and training budget of the stand-in (the captioner's tower sizes; longer answers)."""

    hidden: int = 64
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    patch: int = 16
    image_size: int = 64
    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 64
    pairs_per_image: int = 2  # partners per training image
    near_pairs: bool = True  # the first partner a near one (see `pretrain_pairs`), the others random
    heldout: int = 500  # the last `heldout` pretrain images: never trained on, their pairs score the editor
    max_new_tokens: int = 96  # a random pair's text is at most ~80 words here


def pretrain_pairs(scenes: list[str], rows: range, k: int, seed: int, near: bool = False,
                   candidates: int = 64) -> list[tuple[int, int, str]]:
    """`(reference row, target row, text)` for `k` random partners of each row of `rows` (among `rows`, never
    itself), the text the world's grammar says of the pair; pairs of equal scenes (no modification) are left out.
    `near=True` makes the first partner of each row a near one instead: of `candidates` random rows, one whose
    scene differs by the fewest clauses (short texts, closer to a benchmark query's single modification)."""
    rng = random.Random(seed)
    parsed = {r: scene_from_json(scenes[r]) for r in rows}
    pairs = []
    for r in rows:
        others = [x for x in rows if x != r]
        partners = rng.sample(others, k)
        if near:
            pool = [x for x in rng.sample(others, min(candidates, len(others))) if difference(parsed[r], parsed[x])]
            partners[0] = min(pool, key=lambda x: len(difference(parsed[r], parsed[x])))
        for t in partners:
            if difference(parsed[r], parsed[t]):
                pairs.append((r, t, describe_difference(parsed[r], parsed[t], rng)))
    return pairs


def build_editor(texts: list[str], cfg: EditorConfig, seed: int = 0):
    """A randomly initialized tiny two-image LLaVA and its processor; the vocabulary is the training texts' words
    plus the prompt's and the chat template's."""
    tokenizer = _word_tokenizer(list(texts) + [EDIT_PROMPT, CHAT_WORDS])
    processor = llava_processor(tokenizer, cfg)
    prompt = len(tokenizer(EDIT_PROMPT + " " + CHAT_WORDS)["input_ids"])
    positions = 2 * ((cfg.image_size // cfg.patch) ** 2 + 1) + prompt + 8 + cfg.max_new_tokens
    return tiny_llava(tokenizer, cfg, positions, seed), processor


def start_vision_from(model, checkpoint: str | Path) -> None:
    """The editor's vision tower and projector start from those of another LLaVA of the same sizes (the recipe's
    captioner, trained on `pretrain` images too), as real multimodal LLMs start from a pre-trained vision tower;
    its decoder (another vocabulary) stays new."""
    from transformers import LlavaForConditionalGeneration

    source = LlavaForConditionalGeneration.from_pretrained(str(checkpoint))
    for name in ("vision_tower", "multi_modal_projector"):
        getattr(model.model, name).load_state_dict(getattr(source.model, name).state_dict())


def _prompt_ids(processor, image) -> torch.Tensor:
    """The token ids `MLLMEditWriter` sends before the answer (two images' tokens expanded, then the prompt)."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": EDIT_PROMPT}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True)
    return processor(images=[[image, image]], text=[text], return_tensors="pt")["input_ids"][0]


def train_generative_editor(pretrain, output_dir: str | Path, cfg: EditorConfig | None = None, seed: int = 0,
                            show_progress_bar: bool = True, vision_from: str | Path | None = None) -> dict:
    """Train the stand-in on pairs of `pretrain` minus its last `cfg.heldout` images (its vision tower and projector
    starting from `vision_from`'s, see `start_vision_from`), save it to `output_dir`, and score it through
    `MLLMEditWriter` on pairs of the held-out images. Reuses a finished checkpoint of the same config, seed, data
    and start. Returns `{"path", "heldout", "config", "pairs", "seconds", ...}`."""
    cfg = cfg or EditorConfig()
    output_dir = Path(output_dir)
    n_train = len(pretrain) - cfg.heldout
    manifest = {"config": asdict(cfg), "seed": seed, "images": len(pretrain),
                "first_ids": pretrain["image_id"][:3], "last_ids": pretrain["image_id"][-3:],
                "vision_from": None if vision_from is None else [str(vision_from), weights_identity(str(vision_from), None)]}
    stamp = output_dir / "editor_manifest.json"
    done = stored_summary(stamp, manifest)
    if done is not None:
        return done
    start = time.perf_counter()
    scenes, images = list(pretrain["scene"]), list(pretrain["image"])
    pairs = pretrain_pairs(scenes, range(n_train), cfg.pairs_per_image, seed, near=cfg.near_pairs)
    model, processor = build_editor([text for _, _, text in pairs], cfg, seed)
    if vision_from is not None:
        start_vision_from(model, vision_from)
    pixels = processor.image_processor(images[:n_train], return_tensors="pt")["pixel_values"]
    pair_pixels = torch.stack([pixels[[r, t]] for r, t, _ in pairs])  # [P, 2, 3, S, S]: reference, target
    losses = train_answers(model, processor, _prompt_ids(processor, images[0]), pair_pixels,
                           [text for _, _, text in pairs], cfg, seed, "Editor: training on 'pretrain' pairs",
                           show_progress_bar)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    trained = time.perf_counter() - start
    heldout = pretrain_pairs(scenes, range(n_train, len(pretrain)), 1, seed + 1)
    editor = load_editor(output_dir, cfg)
    written = []
    for i in range(0, len(heldout), 100):
        batch = heldout[i:i + 100]
        written += editor({"reference_image": [images[r] for r, _, _ in batch],
                           "target_image": [images[t] for _, t, _ in batch],
                           "reference_id": [str(r) for r, _, _ in batch], "target_id": [str(t) for _, t, _ in batch]})
    truths = [difference(scene_from_json(scenes[r]), scene_from_json(scenes[t])) for r, t, _ in heldout]
    summary = {"path": str(output_dir), "heldout": edit_scores(written, truths), "config": asdict(cfg),
               "pairs": len(pairs), "parameters": sum(p.numel() for p in model.parameters()),
               "final_loss": losses[-1], "train_seconds": round(trained, 1),
               "seconds": round(time.perf_counter() - start, 1),
               "examples": [{"written": w, "truth": h[2]} for w, h in zip(written[:3], heldout[:3])]}
    store_summary(stamp, manifest, summary)
    return summary


def load_editor(path: str | Path, cfg: EditorConfig | None = None) -> MLLMEditWriter:
    """The trained stand-in behind the edit-writer interface (the default prompt, greedy decoding)."""
    return MLLMEditWriter(str(path), max_new_tokens=(cfg or EditorConfig()).max_new_tokens)
