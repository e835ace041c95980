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

import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.storage import apply_umask, atomic_write_bytes, directory_lock

from .bank_extras import ExtraImages, add_extra_negatives
from .candidate_bank import CandidateBank, bank_image_ids, load_or_build_candidate_bank
from .checkpoints import (
    WholeRunLoss,
    check_fresh_output_dir,
    check_optimizer_state,
    check_resume,
    resolve_resume,
    run_record,
    write_run_record,
)
from .data import CIRCollator, check_training_triplets, tokenize_training_texts
from .evaluation import PROTOCOLS
from .length_groups import LengthGroupedOrder
from .lora import (
    apply_lora,
    check_lora_optimizer_scope,
    is_lora_model,
    write_lora_metadata,
)
from .model_card import base_description, logged_evaluation, trainer_card
from .losses import (
    CandidateBankLoss,
    ShardedCandidateBankLoss,
    shard_bounds,
    stage1_loss_for,
)
from .optimizer import decay_parameter_names, fused_adamw_supported
from .training_args import STAGES, CIRTrainingArguments

logger = logging.getLogger(__name__)


def candidate_bank_loss(bank: CandidateBank, args: CIRTrainingArguments, temperature: float, similarity):
    """Stage 2's loss with the bank moved once to the training device (fp32): the whole bank, or with
    `args.shard_bank` under DDP this rank's 1/W of its rows (`ShardedCandidateBankLoss`, the same loss)."""
    from modeling_spn4cir.distributed import world

    rank, world_size = world()
    if args.in_batch_negatives and bank.extra is not None:
        raise ValueError("--in_batch_negatives scores the batch's targets only: the extra negatives of "
                         "--bank_extra_images would never be used. Drop one of the two.")
    negatives = bank.negatives  # the triplet images' rows, then the extra negatives'
    if args.shard_bank and args.num_negatives is not None:  # in one process as under DDP
        raise ValueError("--shard_bank computes the full-bank loss; it cannot be combined with --num_negatives.")
    if args.shard_bank and world_size > 1:
        start, stop = shard_bounds(bank.size, rank, world_size)
        return ShardedCandidateBankLoss(negatives[start:stop], start, bank.size, temperature,
                                        similarity=similarity, device=args.device)
    return CandidateBankLoss(negatives, temperature, args.num_negatives, similarity=similarity,
                             device=args.device, in_batch=args.in_batch_negatives)


def _numbered(triplets):
    """The triplets with a `row_index` column 0..n-1 (the key of each row's random text draws and of its tokens)."""
    if "row_index" not in triplets.column_names:
        return triplets.add_column("row_index", list(range(len(triplets))))
    if list(triplets["row_index"]) != list(range(len(triplets))):
        raise ValueError("The training triplets have a row_index column that does not number them 0..n-1 in order; "
                         "CIRTrainer numbers the rows itself: remove the column (triplets.remove_columns('row_index')).")
    return triplets


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch, so that its per-row random draws change every epoch."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


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
        model_card_info: what the model card says of the run (`base_model` as a Hub id, `datasets`, `license`,
            the evaluated dataset and split, `sections`: markdown sections appended after the usage, ...: see
            `trainers.model_card`).
    """

    can_return_loss = True

    def __init__(self, model, args: CIRTrainingArguments, train_dataset=None, corpus=None, processor=None,
                 evaluator=None, join_annotated_captions: bool = False, dedup_map=None,
                 bank: CandidateBank | None = None, model_card_info: dict | None = None,
                 extra_negatives: ExtraImages | None = None, **kwargs):
        corpora = corpus if isinstance(corpus, (list, tuple)) else [corpus]
        self.images = ImageStore(*corpora)
        if train_dataset is not None:  # a bad row named now, not at its step
            # stage 2 from a given bank needs no image: there the bank's ids (and the dedup map's) are what is known
            known = self.images if corpus is not None or bank is None else {*bank.image_ids, *(dedup_map or {})}
            check_training_triplets(train_dataset, known)
        self.evaluator = evaluator
        base, base_text = base_description(getattr(model, "name_or_path", None) or None)
        self.model_card_info = {"base_model": base, "base": base_text, **(model_card_info or {})}
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
        self.training_texts = None
        if train_dataset is not None:
            train_dataset = _numbered(train_dataset)
            # tokenized once here, not per step; stage 2's length-grouped order reads their lengths
            self.training_texts = tokenize_training_texts(train_dataset, processor, join_annotated_captions,
                                                          args.max_text_length, args.seed)
        collator = CIRCollator(
            processor, args.stage, image_processor=processor.image_processor, images=self.images,
            bank=self.bank, join_annotated_captions=join_annotated_captions, max_length=args.max_text_length,
            dedup_map=dedup_map, seed=args.seed, cache_images=args.cache_images, texts=self.training_texts,
        )
        self._prior_loss_sum: float | None = None
        self._nonfinite_streak = 0
        self._card_metrics: dict | None = None  # the last evaluation, which the model card shows
        self._output_dir_step: int | None = None  # the step whose weights this trainer saved into args.output_dir
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_CollatorEpoch(collator), WholeRunLoss(self)]
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
    def _get_train_sampler(self, train_dataset=None):
        if not self.args.group_by_text_length or self.training_texts is None:
            return super()._get_train_sampler(train_dataset)
        args = self.args
        update = args.train_batch_size * args.world_size * args.gradient_accumulation_steps  # rows per update
        return LengthGroupedOrder(self.training_texts.row_lengths, len(self.training_texts), update,
                                  seed=args.data_seed if args.data_seed is not None else args.seed,
                                  groups_per_bucket=args.length_groups_per_bucket)

    def get_decay_parameter_names(self, model) -> list[str]:
        if self.args.decay_norms_and_biases:
            return decay_parameter_names(model)
        return super().get_decay_parameter_names(model)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if kwargs.get("fused") and model is not None and not fused_adamw_supported(model.parameters()):
            logger.info("No fused AdamW kernel for these parameters' device: torch's default AdamW (the same update).")
            kwargs = {**kwargs, "fused": False}
        return optimizer_cls, kwargs

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x input tokens x non-embedding parameters), with the parameters counted once, not
        at every step (a walk over every module)."""
        if getattr(self, "_counted", (None,))[0] is not self.model:
            count = self.model.num_parameters(exclude_embeddings=True) if hasattr(self.model, "num_parameters") else 0
            self._counted = (self.model, count)
        tokens = inputs["input_ids"].numel() if "input_ids" in inputs else 0
        return 6 * tokens * self._counted[1]

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.args.max_grad_norm <= 0:
            return None  # no clipping (the original's procedure): no pass over every gradient only to log its norm
        return super()._get_grad_norm(model, grad_norm)

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
            if isinstance(callback, WholeRunLoss) and callback.trainer is None:
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
        """`Trainer.train` holding the lock of `output_dir` (a second run into it fails naming this one), resuming
        only from a complete checkpoint of a run with the same settings (`trainers.checkpoints`)."""
        self._check_batch_fits()
        with directory_lock(self.args.output_dir, "training output"):
            checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
            if checkpoint is None:
                check_fresh_output_dir(self.args.output_dir)
            else:
                check_resume(checkpoint, run_record(self.model, self.args.stage, self.bank))
            output = super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint:
            best_step = int(self.state.best_model_checkpoint.rsplit("-", 1)[-1])
            self._card_metrics = logged_evaluation(self.state.log_history, best_step)  # the weights loaded back
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
            check_optimizer_state(checkpoint, self.args.resume_without_optimizer_state)
        return super()._load_optimizer_and_scheduler(checkpoint)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written before the mark
        if self.args.should_save and folder.is_dir():
            write_run_record(folder, run_record(self.model, self.args.stage, self.bank))

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        evaluation = self.evaluator(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in evaluation.items()}
        metrics[f"{metric_key_prefix}_epoch"] = self.state.epoch or 0.0
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._card_metrics = evaluation
        if self._output_dir_step == self.state.global_step:  # the output directory holds the weights just evaluated
            self._write_card(Path(self.args.output_dir))
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
        apply_umask(output_dir)
        if output_dir.resolve() == Path(self.args.output_dir).resolve():
            self._output_dir_step = self.state.global_step
        self._write_card(output_dir)
        if is_lora_model(self.model):
            write_lora_metadata(self.model, output_dir, self.processing_class)

    # ------------------------------------------------------------------------------------------ model card
    def create_model_card(self, *args, **kwargs) -> None:
        """`push_to_hub` calls this: publish our CIR card (stage, settings, the last evaluation) instead of the
        generic one."""
        self._write_card(Path(self.args.output_dir))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        self._write_card(Path(self.args.output_dir))  # pushed while training: the card of the weights it copies
        super()._push_from_checkpoint(checkpoint_folder)

    def model_card(self) -> str:
        """The model card (`trainers.model_card`) with the metrics of the last evaluation."""
        metrics = self._card_metrics if self._card_metrics is not None else logged_evaluation(self.state.log_history)
        return trainer_card(self, metrics)

    def _write_card(self, output_dir: Path) -> None:
        """README.md of `output_dir`, from the main process."""
        if self.args.should_save:
            atomic_write_bytes(output_dir / "README.md", self.model_card().encode())


__all__ = ["PROTOCOLS", "STAGES", "CIRTrainer", "CIRTrainingArguments"]
