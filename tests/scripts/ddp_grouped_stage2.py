"""Run under torchrun (2 gloo ranks): `ddp_grouped_stage2.py MODEL_DIR DATA_DIR OUT`. Stage 2 with length-grouped
batches (its default) on 2 processes x batch 2 x 2 accumulation steps, two SGD updates; rank 0 writes the trained
weights to OUT/ddp.pt. `tests/test_cir_trainer.py` trains the same updates in one process with batch 8 (the same
rows per update) and compares."""

import sys
from pathlib import Path

from _dist import init_gloo, save_from_rank0  # this folder: the script's own


def varied_texts(train):
    """Two captions per triplet (joined at random, FashionIQ style) of lengths 2-9 words: batches pad differently."""
    return train.map(lambda r, i: {"modification_texts": [" ".join(["red"] * (1 + i % 6)),
                                                          "make it blue" + " and more" * (i % 4)]}, with_indices=True)


def train_grouped_stage2(model_dir, data_dir, out, batch, accumulation) -> dict:
    """Two SGD updates of stage 2 on the varied texts; -> the trainable weights after them."""
    import datasets

    from modeling_spn4cir.loading import load_cir_model_and_processor
    from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

    model, processor = load_cir_model_and_processor(str(model_dir))
    train = varied_texts(datasets.load_dataset(str(data_dir), "triplets", split="train"))
    corpus = datasets.load_dataset(str(data_dir), "corpus", split="train")
    args = CIRTrainingArguments(output_dir=str(Path(out) / "run"), stage="candidate_bank", max_steps=2,
                                per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                optim="sgd", learning_rate=0.5, report_to=[], use_cpu=True, disable_tqdm=True,
                                save_strategy="no", seed=0, bank_dir=str(Path(out) / "bank"),
                                group_by_text_length=True, length_groups_per_bucket=2)
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor,
                         join_annotated_captions=True)
    assert args.group_by_text_length
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def main(model_dir, data_dir, out):
    init_gloo()
    save_from_rank0(train_grouped_stage2(model_dir, data_dir, out, batch=2, accumulation=2), Path(out) / "ddp.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
