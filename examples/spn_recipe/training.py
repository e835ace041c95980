"""The recipe's models: the small CLIP4CIR built from a config (step 2), its stage-0 warm-up (step 3), and one
`CIRTrainer` run per stage-1 / stage-2 row (steps 4, 7, 8)."""

from __future__ import annotations

from pathlib import Path

import torch

from modeling_spn4cir import CLIP4CIRConfig, CLIP4CIRModel
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

from .config import RecipeConfig, say
from .warmup import image_text_warmup


def build_model(tokenizer, cfg: RecipeConfig) -> CLIP4CIRModel:
    m = cfg.model_sizes
    config = CLIP4CIRConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=m["hidden"], intermediate_size=2 * m["hidden"],
                         num_hidden_layers=m["text_layers"], num_attention_heads=m["heads"],
                         max_position_embeddings=tokenizer.model_max_length, projection_dim=m["hidden"],
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=(
            dict(model_type="clip4cir_resnet", layers=m["resnet_layers"], width=m["resnet_width"], image_size=64,
                 projection_dim=m["hidden"])
            if m.get("tower") == "resnet" else
            dict(hidden_size=m["hidden"], intermediate_size=2 * m["hidden"], num_hidden_layers=m["layers"],
                 num_attention_heads=m["heads"], image_size=64, patch_size=m["patch"], projection_dim=m["hidden"])
        ),
        projection_dim=m["hidden"], fusion="sum", temperature=cfg.temperature,
    )
    torch.manual_seed(cfg.seed)
    return CLIP4CIRModel(config)


def warm_up(model: CLIP4CIRModel, processor, pretrain, cfg: RecipeConfig) -> list[float]:
    """Stage 0: image-caption contrastive training on the `pretrain` images, a stand-in for CLIP's pre-training
    (not part of SPN). Returns the per-step losses."""
    say("stage 0: image-caption contrastive warm-up on the 'pretrain' images — a stand-in for CLIP's "
        "pre-training, not part of SPN")
    pixels = processor.image_processor([im for im in pretrain["image"]])["pixel_values"]
    return image_text_warmup(model, pixels, list(pretrain["caption"]), processor.tokenizer, cfg.stage0_epochs,
                             learning_rate=cfg.stage0_lr, temperature=cfg.temperature, seed=cfg.seed,
                             show_progress_bar=cfg.show_progress_bar)


def load_model(path: Path) -> CLIP4CIRModel:
    return CLIP4CIRModel.from_pretrained(path)


def train_cir(model, processor, cfg: RecipeConfig, stage: str, train, corpus, out: Path,
              lora_r: int | None = None, bank_dir: Path | None = None, seed: int | None = None,
              extra_negatives=None, evaluator=None, card: dict | None = None,
              **options) -> tuple[CLIP4CIRModel, dict | None]:
    """One CIRTrainer run, saved to `out`; -> (the model, its metrics by `evaluator`, or None without one).
    `bank_dir`: where stage 2's candidate bank is kept; two runs from the same stage-1 model over the same images
    share one (the bank is fingerprinted, so it is reused only when it matches). `seed`: the run's data order and
    sampling (default `cfg.seed`); `extra_negatives` (stage 2's `ExtraImages`) and `options` (more
    `CIRTrainingArguments`: `negative_types`, `num_negatives`, `in_batch_negatives`) are the negative study's.
    `card`: the model card's `model_card_info` (`trainers.model_card`)."""
    epochs, lr, batch = ((cfg.stage1_epochs, cfg.stage1_lr, cfg.stage1_batch_size) if stage == "in_batch"
                         else (cfg.stage2_epochs, cfg.stage2_lr, cfg.stage2_batch_size))
    if lora_r is not None:
        lr = cfg.lora_lr
    args = CIRTrainingArguments(
        output_dir=str(out), stage=stage, num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch,
        per_device_eval_batch_size=256, warmup_steps=0, weight_decay=0.01, lr_scheduler_type="linear",
        logging_strategy="epoch", save_strategy="no", report_to=[], seed=cfg.seed if seed is None else seed,
        data_seed=cfg.seed if seed is None else seed,
        disable_tqdm=not cfg.show_progress_bar, use_cpu=True, bank_dir=str(bank_dir or out / "bank"),
        dataloader_drop_last=True, lora_r=lora_r,
        cache_images=stage == "in_batch",  # exact; each epoch would otherwise decode and resize every image again
        **options,
    )
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor,
                         extra_negatives=extra_negatives, model_card_info=card)
    result = trainer.train()
    trainer.save_model(str(out))
    say(f"{out.name}: {stage}, {len(train)} triplets, {epochs} epochs, final loss "
        f"{trainer.state.log_history[-2].get('loss', result.training_loss):.3f}")
    if evaluator is None:
        return model, None
    # Given after construction, so that stage 2 does not hand it the bank: every row of the table is scored by the
    # one test evaluator in the same way, as the recipe's published numbers were.
    trainer.evaluator = evaluator
    metrics = trainer.evaluate()  # and the model card in `out` records them
    return model, {k[len("eval_"):]: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_epoch"}
