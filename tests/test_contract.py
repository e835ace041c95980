"""The generalized model contract, proven by a tiny family with multi-vector targets `[N, Q, D]` (max over tokens)
and token-level reference features `[N, T, H]`: it trains through stage 1 and stage 2 and evaluates."""

import datasets
import pytest
import torch
from conftest import tiny_tokenizer
from multivector_family import MultiVectorConfig, MultiVectorModel

from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.evaluation import CIREvaluator


def _setup(tiny_cir_dataset):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(["make it blue", "red circle", "and more"])
    model = MultiVectorModel(MultiVectorConfig(vocab_size=len(tokenizer)))
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=32), tokenizer=tokenizer)
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    return model, processor, train, corpus


def _args(tmp_path, stage):
    return CIRTrainingArguments(output_dir=str(tmp_path / stage), stage=stage, per_device_train_batch_size=4,
                                num_train_epochs=2, learning_rate=5e-2, report_to=[], use_cpu=True,
                                disable_tqdm=True, save_strategy="no", seed=0)


def _naive_recall_at(model, processor, corpus, triplets, k):
    """Recall@k by a per-query python loop: score = max over target tokens, reference removed, full sort."""
    ids = list(dict.fromkeys(corpus["image_id"]))
    images = {i: im for i, im in zip(corpus["image_id"], corpus["image"])}
    pixels = processor.image_processor([images[i] for i in ids], return_tensors="pt")["pixel_values"]
    hits = 0
    with torch.no_grad():
        targets = model.get_target_embeds(pixels)
        for row in triplets:
            tokens = processor.tokenizer([row["modification_texts"][0]], return_tensors="pt")
            ref = ids.index(row["reference_id"])
            query = model.get_query_embeds(tokens["input_ids"], tokens["attention_mask"], pixel_values=pixels[ref:ref + 1])[0]
            scores = [max(float(query @ t) for t in targets[g]) for g in range(len(ids))]
            order = [g for g in sorted(range(len(ids)), key=lambda g: (-scores[g], g)) if g != ref]
            hits += ids.index(row["target_id"]) in order[:k]
    return 100 * hits / len(triplets)


def test_multivector_family_trains_both_stages_and_evaluates(tiny_cir_dataset, tmp_path):
    model, processor, train, corpus = _setup(tiny_cir_dataset)
    target_side = ("patchify", "target_proj")

    # stage 1: both sides train; the in-batch loss scores [B, D] queries against gathered [B, Q, D] targets
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage1 = CIRTrainer(model, _args(tmp_path, "in_batch"), train_dataset=train, corpus=corpus, processor=processor)
    stage1.train()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert set(target_side) <= changed and {"text_proj", "reference_proj"} <= changed

    # stage 2: the bank stores the family's shapes; only the query side moves
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage2 = CIRTrainer(model, _args(tmp_path, "candidate_bank"), train_dataset=train, corpus=corpus,
                        processor=processor)
    n_bank = len(set(train["reference_id"]) | set(train["target_id"]))
    assert stage2.bank.target_embeds.shape == (n_bank, 3, 8)
    assert stage2.bank.reference_features.shape == (n_bank, 16, 16)
    stage2.train()
    for k, v in model.state_dict().items():
        moved = not torch.equal(v, before[k])
        if k.startswith(target_side):
            assert not moved, k
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith("text_proj"))

    # evaluation ranks with the family's own similarity (max over target tokens)
    val_corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="val")
    val = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="val")
    metrics = CIREvaluator(val_corpus, val, processor.image_processor, processor.tokenizer, show_progress_bar=False)(model)
    for k in (1, 5, 10):
        assert abs(metrics[f"recall@{k}"] - _naive_recall_at(model.eval(), processor, val_corpus, val, k)) < 1e-4


@pytest.mark.parametrize("family", ["multivector", "clip4cir"])
def test_stage2_query_keeps_its_dtype_with_a_half_precision_bank(family, tiny_cir_dataset, tiny_model_dir, tmp_path):
    model, processor, train, corpus = _setup(tiny_cir_dataset)
    if family == "clip4cir":
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    args = _args(tmp_path, "candidate_bank")
    args.bank_dtype = "bfloat16"
    trainer = CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor)
    assert trainer.bank.target_embeds.dtype == torch.bfloat16
    batch = trainer.data_collator([train[i] | {"row_index": i} for i in range(4)])
    assert batch["reference_features"].dtype == torch.bfloat16
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                reference_features=batch["reference_features"])
    assert out.query_embeds.dtype == torch.float32
    loss = trainer.compute_loss(model, batch)
    assert loss.dtype == torch.float32
