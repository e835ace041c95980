"""`CIRTrainer`: a thin `transformers.Trainer` for SPN's two stages.

- `stage="in_batch"` (stage 1): query and target towers trained with the family's stage-1 objective
  (`config.stage1_loss`: `InBatchInfoNCELoss` unless the family brings its own, see `trainers.losses.stage1_loss_for`).
- `stage="candidate_bank"` (stage 2): the target side is frozen, every training image is encoded once into a
  `CandidateBank`, and only `model.query_side_parameters()` are trained with `CandidateBankLoss`; batches
  carry bank rows, so no image is decoded or encoded while training.

Evaluation goes through a `CIREvaluator` (logged as `eval_*`); checkpoints are `save_pretrained` directories
with the processor and a model card.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.model_cards import render_card, table

from .bank_extras import ExtraImages, add_extra_negatives
from .candidate_bank import CandidateBank, bank_image_ids, load_or_build_candidate_bank
from .data import CIRCollator
from .evaluation import PROTOCOLS
from .lora import (
    LoRAArguments,
    apply_lora,
    check_lora_optimizer_scope,
    is_lora_model,
    lora_card_rows,
    write_lora_metadata,
)
from .losses import (
    DEFAULT_NEGATIVE_TYPES,
    NEGATIVE_TYPES,
    CandidateBankLoss,
    ShardedCandidateBankLoss,
    check_negative_types,
    shard_bounds,
    stage1_loss_for,
)

logger = logging.getLogger(__name__)
STAGES = ("in_batch", "candidate_bank")


@dataclass
class CIRTrainingArguments(LoRAArguments, TrainingArguments):
    """`TrainingArguments` plus SPN's knobs (and the LoRA options of `trainers.lora.LoRAArguments`)."""

    stage: str = field(default="in_batch", metadata={"help": "in_batch (stage 1) or candidate_bank (stage 2)"})
    temperature: float | None = field(default=None, metadata={
        "help": "InfoNCE tau; default: the model config's. Written into the model config, so the saved "
                "checkpoint records the tau it was trained with"})
    bank_dir: str | None = field(default=None, metadata={"help": "where the stage-2 bank is cached (fingerprinted)"})
    bank_dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    bank_shard_size: int = field(default=1024, metadata={
        "help": "images per bank shard in --bank_dir (memory-mapped; a killed build resumes at the first missing "
                "shard)"})
    num_negatives: int | None = field(default=None, metadata={"help": "stage 2: sampled negatives (default: whole bank)"})
    in_batch_negatives: bool = field(default=False, metadata={
        "help": "stage 2: each query's negatives are only the bank rows of the global batch's other targets "
                "(stage 1's negatives with a frozen target side), the number-of-negatives study's smallest point"})
    negative_types: list[str] = field(default_factory=lambda: list(DEFAULT_NEGATIVE_TYPES), metadata={
        "help": "stage 1: the negative types of SPN's study, any subset: target (query vs in-batch targets, the "
                "default), query (target vs in-batch queries), text (reference + every in-batch text), reference "
                "(every in-batch reference + text); the selected InfoNCE losses are averaged",
        "choices": list(NEGATIVE_TYPES)})
    shard_bank: bool = field(default=False, metadata={
        "help": "stage 2 under DDP: each rank holds 1/W of the bank's rows on its device; the full-bank loss is "
                "computed exactly (distributed log-sum-exp), for banks that do not fit one device"})
    max_text_length: int | None = field(default=None, metadata={"help": "truncate modification texts (tokens)"})
    cache_images: bool = field(default=False, metadata={
        "help": "stage 1: keep every preprocessed image in memory after its first use, so later epochs decode and "
                "resize nothing (3*S*S*4 bytes per image: 49 KB at 64 px, 1 MB at 288 px; per dataloader worker). "
                "For corpora that fit in RAM; exact, as preprocessing is deterministic"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: the collator needs the ids"})
    max_consecutive_nonfinite_losses: int = field(default=1, metadata={
        "help": "stop training with an error naming the step when this many consecutive steps have a NaN/inf "
                "loss; below it, the gradients accumulated so far in that optimizer step are dropped"})
    resume_without_optimizer_state: bool = field(default=False, metadata={
        "help": "allow resuming from a checkpoint that lacks optimizer.pt or scheduler.pt (the optimizer and the "
                "learning-rate schedule then restart from scratch); refused by default"})

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        if self.remove_unused_columns:
            raise ValueError("CIRTrainer needs remove_unused_columns=False (the collator reads image ids).")
        self.negative_types = list(check_negative_types(self.negative_types))
        if self.stage == "candidate_bank" and tuple(self.negative_types) != DEFAULT_NEGATIVE_TYPES:
            raise ValueError(f"--negative_types {' '.join(self.negative_types)} is a stage-1 option: stage 2's "
                             "negatives are the bank's targets. Drop it, or train with --stage in_batch.")
        if self.in_batch_negatives and (self.stage != "candidate_bank" or self.num_negatives or self.shard_bank):
            raise ValueError("--in_batch_negatives is a stage-2 option of its own: use it with --stage candidate_bank "
                             "and without --num_negatives or --shard_bank.")
        if self.max_consecutive_nonfinite_losses < 1:
            raise ValueError("max_consecutive_nonfinite_losses must be >= 1, got "
                             f"{self.max_consecutive_nonfinite_losses}.")


def candidate_bank_loss(bank: CandidateBank, args: CIRTrainingArguments, temperature: float, similarity):
    """Stage 2's loss with the bank moved once to the training device (fp32): the whole bank, or with
    `args.shard_bank` under DDP this rank's 1/W of its rows (`ShardedCandidateBankLoss`, the same loss)."""
    from modeling_spn4cir.distributed import world

    rank, world_size = world()
    if args.in_batch_negatives and bank.extra is not None:
        raise ValueError("--in_batch_negatives scores the batch's targets only: the extra negatives of "
                         "--bank_extra_images would never be used. Drop one of the two.")
    negatives = bank.negatives  # the triplet images' rows, then the extra negatives'
    if args.shard_bank and world_size > 1:
        if args.num_negatives is not None:
            raise ValueError("--shard_bank computes the full-bank loss; it cannot be combined with --num_negatives.")
        start, stop = shard_bounds(bank.size, rank, world_size)
        return ShardedCandidateBankLoss(negatives[start:stop], start, bank.size, temperature,
                                        similarity=similarity, device=args.device)
    return CandidateBankLoss(negatives, temperature, args.num_negatives, similarity=similarity,
                             device=args.device, in_batch=args.in_batch_negatives)


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch, so that its per-row random draws change every epoch."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


class _WholeRunLoss(TrainerCallback, ExportableState):
    """Carries the sum of the training losses of every step so far through checkpoints (in `trainer_state.json`),
    so that a resumed run reports the whole run's `train_loss`, not only the resumed steps' (the Trainer's)."""

    def __init__(self, trainer=None):
        self.trainer = trainer

    def state(self) -> dict:
        trainer = self.trainer
        if trainer is None or not hasattr(trainer, "_tr_loss") or trainer._prior_loss_sum is None:
            return {"args": {}, "attributes": {}}  # unknown: a later resume reports only its own steps
        return {"args": {}, "attributes": {"loss_sum": trainer._whole_run_loss_sum()}}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            return
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        if state.global_step == 0:
            self.trainer._prior_loss_sum = 0.0
        elif "loss_sum" in attributes:
            self.trainer._prior_loss_sum = float(attributes["loss_sum"])
        else:
            self.trainer._prior_loss_sum = None
            logger.warning("The checkpoint records no loss sum (written by an older version): train_loss will average "
                           "only the %d resumed steps.", state.max_steps - state.global_step)


def _on_which_rank() -> str:
    from modeling_spn4cir.distributed import world

    rank, world_size = world()
    return "" if world_size == 1 else f" on rank {rank} (non-finite on at least one rank)"


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the step's loss is finite on every process (one all-reduce of a flag under DDP)."""
    from modeling_spn4cir.distributed import world

    finite = bool(torch.isfinite(loss).all())
    if world()[1] == 1:
        return finite
    import torch.distributed as dist

    flag = torch.tensor([0.0 if finite else 1.0], device=loss.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


class CIRTrainer(Trainer):
    """
    Args:
        model: a CIR model (the model contract: `get_query_embeds`, `get_target_embeds`, ...).
        args: [`CIRTrainingArguments`].
        train_dataset: triplets (HF dataset in the project schema; annotated and generated rows may be mixed).
        corpus: the images the triplets use (one HF dataset or a list of them, `image_id` + `image`).
        processor: a processor with `.image_processor` and `.tokenizer` (saved with every checkpoint).
        evaluator: a `CIREvaluator` run at every evaluation.
        join_annotated_captions: FashionIQ: join the two captions of annotated triplets (see `trainers.text`).
        dedup_map: `{duplicate image id: canonical id}` (from `datasets_scripts.dedup`).
        bank: a prebuilt `CandidateBank` for stage 2 (otherwise built, or loaded from `args.bank_dir`).
        extra_negatives: stage 2: images of no training triplet to append to the bank as negatives only
            ([`ExtraImages`], `trainers.bank_extras`; stored beside the bank in `args.bank_dir`).
        model_card_info: extra fields for the model card (`base_model`, `datasets`, ...).
    """

    can_return_loss = True

    def __init__(self, model, args: CIRTrainingArguments, train_dataset=None, corpus=None, processor=None,
                 evaluator=None, join_annotated_captions: bool = False, dedup_map=None,
                 bank: CandidateBank | None = None, model_card_info: dict | None = None,
                 extra_negatives: ExtraImages | None = None, **kwargs):
        corpora = corpus if isinstance(corpus, (list, tuple)) else [corpus]
        self.images = ImageStore(*corpora)
        self.evaluator = evaluator
        self.model_card_info = dict(model_card_info or {})
        if args.temperature is not None:
            model.config.temperature = args.temperature  # one tau: the loss's is the one the checkpoint records
        self.temperature = model.config.temperature
        # The evaluator computes no eval loss: "loss" (TrainingArguments' default with load_best_model_at_end) would
        # select nothing; pick checkpoints by the dataset's headline metric, as the original's best.pt.
        if evaluator is not None and args.metric_for_best_model in (None, "loss", "eval_loss"):
            args.metric_for_best_model = evaluator.primary_metric  # the dataset's headline number
            args.greater_is_better = True
        if args.stage == "candidate_bank":
            model.untie_query_side()  # SPN's stage-2 preparation (TG-CIR, SPRC copy their shared modules here)
            model.freeze_target_side()
            if train_dataset is not None:
                bank = self._stage2_bank(model, args, bank, train_dataset, processor, dedup_map, extra_negatives)
            self.bank = bank
            self.loss_fn = candidate_bank_loss(bank, args, self.temperature, model.similarity) if bank else None
            if bank is not None and hasattr(evaluator, "use_bank"):
                evaluator.use_bank(bank)  # gallery images the bank holds are not encoded again
        else:
            if extra_negatives is not None:
                raise ValueError("--bank_extra_images adds rows to stage 2's candidate bank; stage 1 (in_batch) has "
                                 "no bank. Pass it with --stage candidate_bank.")
            self.bank = None
            self.loss_fn = stage1_loss_for(model, self.temperature, similarity=model.similarity,
                                           negative_types=args.negative_types)
        if args.lora_r is not None and not is_lora_model(model):
            model = apply_lora(model, args, args.stage)  # after the bank: stage 2's is built from the frozen base
            self.model_card_info.setdefault("base_model", model.peft_config["default"].base_model_name_or_path)
        collator = CIRCollator(
            processor, args.stage, image_processor=processor.image_processor, images=self.images,
            bank=self.bank, join_annotated_captions=join_annotated_captions, max_length=args.max_text_length,
            dedup_map=dedup_map, seed=args.seed, cache_images=args.cache_images,
        )
        if train_dataset is not None and "row_index" not in train_dataset.column_names:
            train_dataset = train_dataset.add_column("row_index", list(range(len(train_dataset))))
        self._prior_loss_sum: float | None = None
        self._nonfinite_streak = 0
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_CollatorEpoch(collator), _WholeRunLoss(self)]
        if evaluator is not None:
            # Trainer insists on an eval_dataset when eval_strategy is set; the evaluator owns the real one.
            kwargs.setdefault("eval_dataset", evaluator.triplets)
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                         processing_class=processor, callbacks=callbacks, **kwargs)
        # The loss is a mean over queries, never normalized by a token count: let the Trainer scale it for
        # gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def _stage2_bank(self, model, args, bank, train_dataset, processor, dedup_map, extra_negatives) -> CandidateBank:
        """The bank of the training images (built or loaded unless given), and the extra negatives appended."""
        options = {"bank_dir": args.bank_dir, "dtype": args.bank_dtype, "batch_size": args.per_device_eval_batch_size,
                   "show_progress_bar": not args.disable_tqdm, "num_workers": args.dataloader_num_workers,
                   "shard_size": args.bank_shard_size}
        if bank is None or extra_negatives is not None:
            model.to(args.device)
        if bank is None:
            # Every rank builds its share of the shards (no rank waits idle in a barrier); see the function.
            bank = load_or_build_candidate_bank(model, self.images, bank_image_ids([train_dataset], dedup_map),
                                                processor.image_processor, dedup_map=dedup_map, **options)
        if extra_negatives is not None:
            bank = add_extra_negatives(bank, model, extra_negatives, self.images, processor.image_processor, **options)
        return bank

    # ------------------------------------------------------------------------------------- training
    def create_optimizer(self, model=None):
        if self.optimizer is None and is_lora_model(self.model):
            check_lora_optimizer_scope(self.model, self.args.stage)  # adapters + modules_to_save, nothing else
        elif self.args.stage == "candidate_bank" and self.optimizer is None:
            query_side = {id(p) for p in self.model.query_side_parameters()}
            extra = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in query_side]
            if extra:
                raise RuntimeError(f"Stage 2 must train only query_side_parameters(); also trainable: {extra[:5]}")
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The model always runs through forward (so DDP sees it); the loss module says what extra outputs it needs.
        if self.args.stage == "in_batch":
            keys = inputs.pop("target_keys", None)
            outputs = model(**inputs, **getattr(self.loss_fn, "model_kwargs", {}))
            loss = getattr(self.loss_fn, "loss_from_outputs", self.loss_fn)(outputs, keys)
        else:
            target_index = inputs.pop("target_index")
            # bank rows in the model's precision: a bf16/fp16 bank never lowers an fp32 query (or its loss)
            dtype = next(model.parameters()).dtype
            if inputs["reference_features"].is_floating_point() and inputs["reference_features"].dtype != dtype:
                inputs["reference_features"] = inputs["reference_features"].to(dtype)
            outputs = model(**inputs)
            loss = self.loss_fn(outputs.query_embeds, target_index, getattr(outputs, "temperature", None))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if _finite_on_every_rank(loss):
            self._nonfinite_streak = 0
            return loss
        # Every rank takes this branch together: DDP has averaged one rank's NaN gradients into all of them, so
        # every rank must drop the step (or stop), not only the rank whose loss is NaN (the others would step
        # with NaN weights, or wait forever for a rank that stopped).
        self._nonfinite_streak += 1
        step = self.state.global_step + 1
        limit = self.args.max_consecutive_nonfinite_losses
        if self._nonfinite_streak >= limit:
            model.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"Training loss is {loss.item()}{_on_which_rank()} at step {step} "
                f"({self._nonfinite_streak} consecutive non-finite "
                f"step(s), max_consecutive_nonfinite_losses={limit}): the run diverged and was stopped before this "
                "step's update. Lower the learning rate (or use bf16 instead of fp16), then resume from the last "
                "checkpoint or restart."
            )
        logger.warning("Non-finite training loss (%s on this rank) at step %d: its gradients are dropped on every rank "
                       "(%d of %d allowed consecutive).", loss.item(), step, self._nonfinite_streak, limit)
        model.zero_grad(set_to_none=True)
        return loss

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        for callback in self.callback_handler.callbacks:  # restore_callback_states_from_checkpoint re-creates them
            if isinstance(callback, _WholeRunLoss) and callback.trainer is None:
                callback.trainer = self

    def _whole_run_loss_sum(self) -> float:
        """Sum of the losses of every step so far, including those before a resume (when the checkpoint says)."""
        return self._prior_loss_sum + self._total_loss_scalar + self._tr_loss.item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        resumed = getattr(self, "_initial_global_step", 0) > 0
        if "train_loss" in logs and resumed and self._prior_loss_sum is not None:
            # The Trainer averages this train() call's steps only; report the whole run's mean, as without resume.
            logs["train_loss"] = (self._prior_loss_sum + self._total_loss_scalar) / max(self.state.global_step, 1)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._check_batch_fits()
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        return output._replace(training_loss=output.metrics.get("train_loss", output.training_loss))

    def _check_batch_fits(self) -> None:
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            return
        n, batch = len(self.train_dataset), self.args.train_batch_size * self.args.world_size
        if n == 0:
            raise ValueError("The training set is empty: there is nothing to train on (check the triplets split).")
        if self.args.dataloader_drop_last and n < batch:
            raise ValueError(
                f"The training set has {n} triplets but one batch takes {batch} (per_device_train_batch_size "
                f"{self.args.per_device_train_batch_size} x {self.args.world_size} processes), and "
                "dataloader_drop_last=True drops the only, incomplete batch: nothing would be trained. Lower "
                f"--per_device_train_batch_size to at most {n // self.args.world_size or 1}, or unset "
                "--dataloader_drop_last."
            )

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and not self.is_deepspeed_enabled:
            saved = {p.name for p in Path(checkpoint).iterdir()} if Path(checkpoint).is_dir() else set()
            # optimizer.pt, optimizer.bin (accelerate), an optimizer folder (FSDP) or per-rank optimizer files
            has_optimizer = any(name.startswith("optimizer") or name.endswith("-optimizer.pt") for name in saved)
            found = {"optimizer.pt": has_optimizer, "scheduler.pt": "scheduler.pt" in saved}
            missing = [name for name, present in found.items() if not present]
            if missing and not self.args.resume_without_optimizer_state:
                raise ValueError(
                    f"Checkpoint {checkpoint} has no {' or '.join(missing)}: resuming would silently restart the "
                    "optimizer state and the learning-rate schedule. Resume from a complete checkpoint, or pass "
                    "--resume_without_optimizer_state to accept a fresh optimizer / schedule."
                )
            if missing:
                logger.warning("Checkpoint %s has no %s: the optimizer state and/or the learning-rate schedule restart "
                               "from scratch (resume_without_optimizer_state=True).", checkpoint, " or ".join(missing))
        return super()._load_optimizer_and_scheduler(checkpoint)

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluator(self.model).items()}
        metrics[f"{metric_key_prefix}_epoch"] = self.state.epoch or 0.0
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --------------------------------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        tensors = state_dict.items() if state_dict is not None else self.model.named_parameters()
        for name, tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise RuntimeError(
                    f"Refusing to save {output_dir or self.args.output_dir}: weight {name!r} contains NaN or inf "
                    "(training diverged). Lower the learning rate and resume from the last finite checkpoint."
                )
        super()._save(output_dir, state_dict)
        output_dir = Path(output_dir or self.args.output_dir)
        (output_dir / "README.md").write_text(self.model_card())
        if is_lora_model(self.model):
            write_lora_metadata(self.model, output_dir, self.processing_class)

    def create_model_card(self, *args, **kwargs) -> None:
        """`push_to_hub` calls this: publish our CIR card (stage, protocol, metrics) instead of the generic one."""
        if self.is_world_process_zero():
            (Path(self.args.output_dir) / "README.md").write_text(self.model_card())

    def model_card(self) -> str:
        """A model card: base model, datasets, stage, protocol and the latest evaluation metrics."""
        from huggingface_hub import ModelCardData

        info = self.model_card_info
        evals = [log for log in self.state.log_history if any(k.startswith("eval_") for k in log)]
        metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if isinstance(v, float) and k.startswith("eval_")}
        protocol = self.evaluator.protocol_description if self.evaluator is not None else "not evaluated"
        stage = {"in_batch": "stage 1 (in-batch InfoNCE)", "candidate_bank": "stage 2 (candidate-bank InfoNCE)"}
        loss_config = json.dumps(self.loss_fn.get_config_dict()) if self.loss_fn is not None else "{}"
        rows = [("base model", info.get("base_model", "unknown")), ("training data", info.get("datasets", "unknown")),
                ("stage", stage[self.args.stage]), ("loss", loss_config),
                ("steps / epochs", f"{self.state.global_step} / {self.state.epoch or 0:.2f}")]
        fields = table(rows) + "\n" + lora_card_rows(self.model) + f"| evaluation protocol | {protocol} |"
        scores = table([(k, f"{v:.2f}") for k, v in metrics.items()] or [("(no evaluation yet)", "")],
                       header=("metric", "value"))
        metadata = ModelCardData(library_name="transformers", tags=["composed-image-retrieval", "spn4cir"],
                                 base_model=info.get("base_model", "unknown"))
        return render_card(metadata, info.get("title", "spn4cir CIR model"),
                           f"Trained with `spn4cir` (SPN: Feng et al., ACM MM 2024) — {stage[self.args.stage]}.",
                           fields, f"## Metrics (latest evaluation, percent)\n\n{scores}")


__all__ = ["CIRTrainer", "CIRTrainingArguments", "PROTOCOLS", "STAGES"]
