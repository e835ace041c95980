"""A training run's checkpoints: what each records of the run, which one a resume may use, and what an output
directory of an earlier run may not be mixed with.

Every `checkpoint-N` that `CIRTrainer` saves gets `spn4cir_run.json`, written last (after the weights, the optimizer,
the schedule, the RNG states and `trainer_state.json`): the run's settings that decide which parameters train and what
they mean — the stage, the family, its fusion and "+Bi" option, the LoRA adapter, the trainable parameters (names and
shapes), and in stage 2 the frozen target side the bank was built from. So

- a checkpoint without it was cut off while saving (Ctrl-C, a crash, a full disk): an explicit
  `--resume_from_checkpoint` of it is refused, naming the newest complete one, and `--resume_from_checkpoint true`
  (the newest checkpoint) skips it with a warning;
- resuming with other settings (stage, family, fusion, +Bi, LoRA, a bank of another target side) is refused with an
  error naming what differs, instead of the optimizer's "parameter group doesn't match" or a state-dict error (or a
  stage-2 query side silently scored against another model's bank);
- a new run (no resume) into an output directory that holds an earlier run's checkpoints is refused: the two runs'
  checkpoints would mix, checkpoint rotation could delete the new run's, and a later resume would pick the old run's.

`WholeRunLoss` carries the loss sum through `trainer_state.json`, so a resumed run reports the whole run's loss.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from modeling_spn4cir.storage import atomic_write_json, json_sha256

logger = logging.getLogger(__name__)

RUN_RECORD = "spn4cir_run.json"
RECORD_FORMAT = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what each setting is called in the error, and the flag that sets it
_SETTINGS = {"stage": "--stage", "model_type": "the family (--model_name_or_path / --model_type)",
             "fusion": "--fusion", "bidirectional": "--bidirectional", "lora": "the LoRA options (--lora_*)",
             "target_side": "the frozen target side the stage-2 bank was built from (--model_name_or_path)",
             "trainable_parameters": "the trainable parameters"}
_CONSEQUENCES = ("target_side", "trainable_parameters")


class WholeRunLoss(TrainerCallback, ExportableState):
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


def run_record(model, stage: str, bank=None) -> dict:
    """The settings of a run that a checkpoint of it must share with a run resuming from it (module docstring)."""
    from .lora import is_lora_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    lora = None
    if is_lora_model(model):
        peft = model.peft_config["default"]
        lora = {"r": peft.r, "alpha": peft.lora_alpha, "target_modules": sorted(peft.target_modules or []),
                "modules_to_save": sorted(peft.modules_to_save or [])}
    trainable = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return {"format": RECORD_FORMAT, "stage": stage, "model_type": config.model_type,
            "fusion": getattr(config, "fusion", None), "bidirectional": bool(getattr(config, "bidirectional", False)),
            "lora": lora, "target_side": bank.fingerprint.get("target_side_weights") if bank is not None else None,
            "trainable_parameters": {"count": len(trainable), "sha256": json_sha256(trainable)}}


def write_run_record(checkpoint: str | Path, record: dict) -> None:
    """Mark `checkpoint` complete (call once every file of the save is written)."""
    atomic_write_json(Path(checkpoint) / RUN_RECORD, record, indent=2)


def _read_record(checkpoint: Path) -> dict | None:
    try:
        record = json.loads((checkpoint / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, newest (largest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), reverse=True)


def _incomplete(checkpoint: Path) -> str:
    return (f"{checkpoint} has no {RUN_RECORD}, which every checkpoint save writes last: its save was interrupted "
            "(Ctrl-C, a crash, a full disk) or it was not written by CIRTrainer")


def resolve_resume(resume, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: None (no resume), the newest complete `checkpoint-N` of `output_dir` for
    `True` / `"true"` (incomplete newer ones skipped with a warning), or the path given, which must be complete."""
    if resume in (None, False, "", "false", "False"):
        return None
    complete = [c for c in checkpoints_in(output_dir) if _read_record(c) is not None]
    if resume is True or resume in ("true", "True"):
        for checkpoint in checkpoints_in(output_dir):
            if _read_record(checkpoint) is not None:
                return str(checkpoint)
            logger.warning("Skipping %s for the resume: %s.", checkpoint, _incomplete(checkpoint))
        raise ValueError(f"--resume_from_checkpoint true: {output_dir} holds no complete checkpoint-N to resume from; "
                         "start without --resume_from_checkpoint.")
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint directory.")
    if _read_record(checkpoint) is None:
        newest = f"the newest complete one is {complete[0]}" if complete else "there is no complete one"
        raise ValueError(f"Cannot resume from {_incomplete(checkpoint)}. Resume from a complete checkpoint "
                         f"({newest} in {output_dir}), or start anew.")
    return str(checkpoint)


def check_resume(checkpoint: str | Path, record: dict) -> None:
    """Raise naming every setting in which this run (`record`) differs from the run that saved `checkpoint`."""
    saved = _read_record(Path(checkpoint)) or {}
    differ = [key for key in _SETTINGS if key in record and saved.get(key) != record[key]]
    named = [key for key in differ if key not in _CONSEQUENCES]
    differ = named or differ  # the bank and the trainable tensors follow from the settings: name those
    if not differ:
        return
    details = "; ".join(f"{_SETTINGS[key]}: the checkpoint has {_short(saved.get(key))}, this run "
                        f"{_short(record[key])}" for key in differ)
    raise ValueError(
        f"Cannot resume from {checkpoint}: it was saved by a run with other settings ({details}). Resume with the "
        "settings it was trained with, or start a new run in another --output_dir (--model_name_or_path "
        f"{checkpoint} starts from its weights)."
    )


def _short(value) -> str:
    if isinstance(value, dict) and set(value) == {"count", "sha256"}:
        return f"{value['count']} tensors (sha256 {value['sha256'][:12]})"
    if isinstance(value, str) and len(value) == 64:
        return f"sha256 {value[:12]}"
    return repr(value)


def check_optimizer_state(checkpoint: str | Path, allow_missing: bool) -> None:
    """A checkpoint without its optimizer or scheduler state is refused unless `allow_missing`
    (`--resume_without_optimizer_state`), then resumed with a warning: the optimizer and the schedule restart."""
    folder = Path(checkpoint)
    saved = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    # optimizer.pt, optimizer.bin (accelerate), an optimizer folder (FSDP) or per-rank optimizer files
    has_optimizer = any(name.startswith("optimizer") or name.endswith("-optimizer.pt") for name in saved)
    found = {"optimizer.pt": has_optimizer, "scheduler.pt": "scheduler.pt" in saved}
    missing = [name for name, present in found.items() if not present]
    if missing and not allow_missing:
        raise ValueError(
            f"Checkpoint {checkpoint} has no {' or '.join(missing)}: resuming would silently restart the optimizer "
            "state and the learning-rate schedule. Resume from a complete checkpoint, or pass "
            "--resume_without_optimizer_state to accept a fresh optimizer / schedule."
        )
    if missing:
        logger.warning("Checkpoint %s has no %s: the optimizer state and/or the learning-rate schedule restart from "
                       "scratch (resume_without_optimizer_state=True).", checkpoint, " or ".join(missing))


def check_fresh_output_dir(output_dir: str | Path) -> None:
    """A run that does not resume must not train into a directory holding another run's checkpoints."""
    earlier = checkpoints_in(output_dir)
    if earlier:
        names = ", ".join(p.name for p in earlier[:3]) + (" ..." if len(earlier) > 3 else "")
        raise ValueError(
            f"--output_dir {output_dir} holds checkpoints of an earlier run ({names}): a new run there would mix its "
            "checkpoints with them (rotation could delete this run's, a resume would pick the old one). Resume that "
            "run with --resume_from_checkpoint true, choose another --output_dir, or delete the old checkpoints."
        )


__all__ = ["RUN_RECORD", "WholeRunLoss", "check_fresh_output_dir", "check_optimizer_state", "check_resume",
           "checkpoints_in", "resolve_resume", "run_record", "write_run_record"]
