"""The original's optimizer maths in `CIRTrainer` (`trainers.optimizer`): weight decay on every trainable parameter,
the fused AdamW kernel (and the fallback where a device has none), and no gradient clipping."""

import datasets
import pytest
import torch

from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments


@pytest.fixture
def stage2(tiny_cir_dataset, tiny_model_dir, tmp_path):
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")

    def make(**kw):
        model, processor = load_cir_model_and_processor(str(tiny_model_dir))
        args = CIRTrainingArguments(output_dir=str(tmp_path / "out"), stage="candidate_bank", report_to=[],
                                    per_device_train_batch_size=4, max_steps=2, logging_steps=1, use_cpu=True,
                                    disable_tqdm=True, save_strategy="no", bank_dir=str(tmp_path / "bank"), **kw)
        return CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor)

    return make


def _decay_by_name(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}


def test_the_original_decays_every_trainable_parameter_the_trainer_not_biases_and_norms(stage2):
    original = stage2(weight_decay=0.05, decay_norms_and_biases=True)
    original.create_optimizer()
    decay = _decay_by_name(original)
    assert set(decay) == {n for n, p in original.model.named_parameters() if p.requires_grad}
    assert set(decay.values()) == {0.05}  # biases and LayerNorm weights too, as torch.optim.AdamW over them all
    assert any("bias" in n for n in decay) and any("layer_norm" in n or "layernorm" in n for n in decay)
    rule = stage2(weight_decay=0.05)
    rule.create_optimizer()
    assert {n for n, w in _decay_by_name(rule).items() if w == 0.0} == {n for n in decay if "bias" in n or "norm" in n}


def test_fused_adamw_where_the_device_has_it_and_the_same_update_elsewhere(stage2, monkeypatch):
    fused = stage2(optim="adamw_torch_fused")
    assert fused.create_optimizer().defaults["fused"] is True  # the CPU has the kernel
    monkeypatch.setattr("trainers.cir_trainer.fused_adamw_supported", lambda parameters: False)
    fallback = stage2(optim="adamw_torch_fused")
    optimizer = fallback.create_optimizer()
    assert not optimizer.defaults["fused"] and isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_no_clipping_means_no_pass_over_the_gradients(stage2, monkeypatch, max_grad_norm):
    trainer = stage2(max_grad_norm=max_grad_norm)
    calls = []
    clip = trainer.accelerator.clip_grad_norm_
    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", lambda *a, **k: calls.append(a[1:]) or clip(*a, **k))
    trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    if max_grad_norm == 0:
        assert calls == [] and all("grad_norm" not in log for log in logged)  # the original never clips
    else:
        assert calls == [(1.0,)] * 2 and all("grad_norm" in log for log in logged)
