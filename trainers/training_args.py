"""`CIRTrainingArguments`: `TrainingArguments` plus SPN's knobs, checked together (which options belong to which
stage), and the optimizer settings that reproduce the original's (see `trainers.optimizer`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .lora import LoRAArguments
from .losses import DEFAULT_NEGATIVE_TYPES, NEGATIVE_TYPES, check_negative_types

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
    group_by_text_length: bool = field(default=False, metadata={
        "help": "stage 2 only (refused in stage 1, whose batch is the negatives): the rows of each optimizer update "
                "drawn from a bucket of --length_groups_per_bucket updates' rows of similar tokenized text length "
                "(reproducible by seed; the same rows per update under DDP and gradient accumulation), so the text "
                "tower pads less. No query's loss changes (each is scored against the whole bank), but which rows "
                "share an update does: off by default, as the original's random batches (docs/training.md: on the "
                "embedded default it moved +P+N, whose annotated and generated texts differ in length, by -2.75 "
                "R@10). With --length_groups_per_bucket 1 every update holds random rows, sorted by length across its "
                "--gradient_accumulation_steps micro-batches: the updates of random batches, each micro-batch padded "
                "to its own longest text"})
    length_groups_per_bucket: int = field(default=50, metadata={
        "help": "with --group_by_text_length: how many updates' rows are sorted by length together (1: each "
                "update's own rows, i.e. random updates; more pads less and groups short texts with short ones)"})
    decay_norms_and_biases: bool = field(default=False, metadata={
        "help": "weight decay on every trainable parameter, biases and LayerNorm weights included, as the original's "
                "torch.optim.AdamW (the paper configs set it); the Trainer's rule decays neither"})
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
        if self.shard_bank and self.num_negatives is not None:  # in one process as under DDP: never ignored
            raise ValueError("--shard_bank computes the full-bank loss; it cannot be combined with --num_negatives. "
                             "Drop one of the two.")
        stage2_only = [flag for flag, value in (("--num_negatives", self.num_negatives),
                                                ("--shard_bank", self.shard_bank)) if value]
        if self.stage != "candidate_bank" and stage2_only:
            raise ValueError(f"{' and '.join(stage2_only)} set the candidate bank's negatives of stage 2; stage 1 "
                             "(in_batch) scores the batch's targets. Drop it, or train with --stage candidate_bank.")
        if self.group_by_text_length and self.stage != "candidate_bank":
            raise ValueError("--group_by_text_length is a stage-2 option: in stage 1 the batch is each query's "
                             "negatives, and batches of similar text length would change them. Drop it, or train "
                             "with --stage candidate_bank.")
        if self.group_by_text_length and self.train_sampling_strategy != "random":
            raise ValueError(f"--train_sampling_strategy {self.train_sampling_strategy} and --group_by_text_length "
                             "both set the batch order: leave out --group_by_text_length to use the former.")
        if self.max_consecutive_nonfinite_losses < 1:
            raise ValueError("max_consecutive_nonfinite_losses must be >= 1, got "
                             f"{self.max_consecutive_nonfinite_losses}.")
