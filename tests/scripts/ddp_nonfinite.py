"""Run under torchrun (2 gloo ranks): `ddp_nonfinite.py MODEL_DIR DATA_DIR OUT`. CIRTrainer under DDP where only
rank 0's loss turns NaN from the second step on (max_consecutive_nonfinite_losses=2): every rank must drop step 2
and stop at step 3 with the error, none may hang or step with NaN gradients. Each rank writes OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch

from _dist import init_gloo  # this folder: the script's own


def main(model_dir, data_dir, out):
    import datasets
    import torch.distributed as dist

    from modeling_spn4cir.loading import load_cir_model_and_processor
    from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

    init_gloo()
    rank = dist.get_rank()
    model, processor = load_cir_model_and_processor(model_dir)
    train = datasets.load_dataset(data_dir, "triplets", split="train")
    corpus = datasets.load_dataset(data_dir, "corpus", split="train")
    args = CIRTrainingArguments(output_dir=str(Path(out) / "run"), stage="in_batch", per_device_train_batch_size=2,
                                max_steps=4, learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                                save_strategy="no", seed=0, logging_steps=1, max_consecutive_nonfinite_losses=2)
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor)
    compute_loss = trainer.compute_loss
    snapshots = []

    def poisoned(model, inputs, return_outputs=False, num_items_in_batch=None):
        snapshots.append(next(p for p in trainer.model.parameters() if p.requires_grad).detach().clone())
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if rank == 0 and trainer.state.global_step >= 1 else loss

    trainer.compute_loss = poisoned
    try:
        trainer.train()
        outcome = "finished"
    except RuntimeError as error:
        outcome = str(error)
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    record = {"outcome": outcome, "finite": finite, "steps_seen": len(snapshots),
              "step2_dropped": len(snapshots) >= 3 and torch.equal(snapshots[1], snapshots[2]),
              "step1_applied": len(snapshots) >= 2 and not torch.equal(snapshots[0], snapshots[1])}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
