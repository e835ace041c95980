"""Who captions the unlabeled pool (`RecipeConfig.captioner`), where its captions are cached, the image encoder
that pairs the pool, and how good the captions are (scored against the scene graph, never used by a model)."""

from __future__ import annotations

from pathlib import Path

from datasets_scripts.captioners import ColumnCaptioner, EmbeddingAdapter, RetrievalCaptioner
from datasets_scripts.captioning import captioner_key
from datasets_scripts.synthetic import phrase_vocabulary, scene_captions

from .config import RecipeConfig
from .generative_captioner import caption_precision, load_captioner
from .stamps import cache_name, config_key
from .training import load_model


def pool_captioner(cfg: RecipeConfig, pool, out: Path, processor, tokenizer):
    """Who captions the unlabeled pool (`cfg.captioner`), and a description of it for the results."""
    if cfg.captioner == "oracle":
        return (ColumnCaptioner(mapping=scene_captions(dict(zip(pool["image_id"], pool["scene"])))),
                "oracle scene-graph captions (diagnostic)")
    if cfg.captioner == "retrieval":
        return (retrieval_captioner(cfg, out, processor, tokenizer),
                f"retrieval over the phrase vocabulary with the stage-1 model, top {cfg.caption_phrases}")
    captioner = load_captioner(out / "captioner")  # where the captioner step's train_generative_captioner saved it
    return captioner, ("tiny LLaVA (CLIP vision + Llama) trained on the 'pretrain' captions, through MLLMCaptioner: "
                       f"'{captioner.prompt_for(None)}', greedy, max {captioner.max_new_tokens} new tokens")


def retrieval_captioner(cfg: RecipeConfig, out: Path, processor, tokenizer) -> RetrievalCaptioner:
    adapter = EmbeddingAdapter(load_model(out / "stage1").eval(), processor.image_processor, tokenizer)
    return RetrievalCaptioner(adapter, phrase_vocabulary(), top_k=cfg.caption_phrases)


def pairing_encoder(out: Path, processor, tokenizer) -> EmbeddingAdapter:
    """The image encoder that ranks the pool for rank-window pairing: the stage-0 model. The original ranks with an
    off-the-shelf image model (Unicom ViT-L/14), not with the CIR model being trained; stage 0 is the stand-in for
    such a pre-trained model here."""
    return EmbeddingAdapter(load_model(out / "stage0").eval(), processor.image_processor, tokenizer)


def caption_cache(cfg: RecipeConfig, captioner) -> Path:
    """Captions are cached (resumable) per config and per captioner, its weights included (`captioner_key`): a
    captioner trained again gets a new cache, not the old captions (nor the cache's error about them)."""
    return Path(cfg.output_dir) / f"captions_{cfg.captioner}_{cache_name([config_key(cfg), captioner_key(captioner)])}"


def pool_precision(corpus, captions: dict[str, str]) -> dict[str, float]:
    """`caption_precision` of the captions of `corpus`'s images against their scene graphs."""
    ids = [i for i in corpus["image_id"] if i in captions]
    scenes = dict(zip(corpus["image_id"], corpus["scene"]))
    return caption_precision([captions[i] for i in ids], [scenes[i] for i in ids])


def retrieval_captions(captioner, pool, batch_size: int = 256) -> dict[str, str]:
    captions = {}
    for start in range(0, len(pool), batch_size):
        batch = pool[start:start + batch_size]
        captions.update(zip(batch["image_id"], captioner({"image": batch["image"]})))
    return captions
