"""Adding a fifth family is one new folder plus one registration line: `tests/toy_family/` registered with
`register_family(SPEC)` gets Auto loading, base wrapping, converter dispatch and its stage-1 loss in `CIRTrainer`
through its spec alone."""

import datasets
import pytest
import torch
from conftest import tiny_tokenizer
from transformers import AutoConfig, AutoModel, AutoProcessor

from modeling_spn4cir import CLIP4CIRModel, families, register_family
from modeling_spn4cir.cir_contract import CLIP4CIRImageProcessor, is_cir_model
from modeling_spn4cir.convert_original_checkpoint import detect_family
from modeling_spn4cir.convert_original_checkpoint import main as convert_main
from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments


@pytest.fixture
def toy():
    """The toy family, registered for this test only (the Auto classes keep their harmless `toy_cir` entry)."""
    import toy_family

    register_family(toy_family.SPEC)
    yield toy_family
    del families.FAMILIES[toy_family.SPEC.name]


def test_auto_classes_load_the_new_family(toy, tmp_path):
    tokenizer = tiny_tokenizer()
    model = toy.ToyCIRModel(toy.ToyCIRConfig(vocab_size=len(tokenizer)))
    processor = toy.SPEC.build_processor(model.config, tokenizer)
    model.save_pretrained(tmp_path / "toy")
    processor.save_pretrained(tmp_path / "toy")
    assert type(AutoConfig.from_pretrained(tmp_path / "toy")) is toy.ToyCIRConfig
    loaded = AutoModel.from_pretrained(tmp_path / "toy")
    assert type(loaded) is toy.ToyCIRModel and is_cir_model(loaded)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    again = AutoProcessor.from_pretrained(tmp_path / "toy")
    assert type(again) is toy.ToyCIRProcessor and isinstance(again.image_processor, CLIP4CIRImageProcessor)
    assert again(text=["make it blue"])["input_ids"].tolist() == processor(text=["make it blue"])["input_ids"].tolist()


def test_the_new_family_starts_from_its_base(toy, tiny_clip_dir):
    model, processor = load_cir_model_and_processor(str(tiny_clip_dir), model_type="toy_cir", temperature=0.3)
    assert type(model) is toy.ToyCIRModel and type(processor) is toy.ToyCIRProcessor
    clip = AutoModel.from_pretrained(tiny_clip_dir)
    assert torch.equal(model.text_embeddings.weight, clip.text_model.embeddings.token_embedding.weight)
    assert model.config.temperature == 0.3 and processor.image_processor.size == model.config.image_size
    # registered after CLIP4CIR, so a CLIP still becomes CLIP4CIR by default, and the new family is offered
    assert type(load_cir_model_and_processor(str(tiny_clip_dir))[0]) is CLIP4CIRModel
    with pytest.raises(ValueError, match="starts from: clip4cir, tgcir, toy_cir"):
        load_cir_model_and_processor(str(tiny_clip_dir), model_type="sprc")


def test_the_dispatcher_converts_the_new_family_s_checkpoints(toy, tmp_path):
    torch.manual_seed(0)
    original = {"toy_original.words": torch.randn(12, 16), "toy_original.patches.weight": torch.randn(16, 3, 8, 8),
                "toy_original.patches.bias": torch.randn(16)}
    torch.save(original, tmp_path / "toy.pt")
    assert detect_family(str(tmp_path / "toy.pt")) == "toy_cir"
    convert_main(["--checkpoint", str(tmp_path / "toy.pt"), "--output_dir", str(tmp_path / "out")])
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert type(model) is toy.ToyCIRModel
    assert torch.equal(model.text_embeddings.weight, original["toy_original.words"])
    assert torch.equal(model.patchify.weight, original["toy_original.patches.weight"])
    assert "ToyCIR converted from `toy.pt`" in (tmp_path / "out" / "README.md").read_text()


def test_the_trainer_trains_stage_1_with_the_new_family_s_objective(toy, tiny_cir_dataset, tmp_path):
    tokenizer = tiny_tokenizer(["make it blue", "red circle", "and more"])
    model = toy.ToyCIRModel(toy.ToyCIRConfig(vocab_size=len(tokenizer)))
    args = CIRTrainingArguments(output_dir=str(tmp_path / "run"), stage="in_batch", per_device_train_batch_size=4,
                                max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = CIRTrainer(model, args, processor=toy.SPEC.build_processor(model.config, tokenizer),
                         train_dataset=datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train"),
                         corpus=datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train"))
    assert type(trainer.loss_fn) is toy.ToySymmetricLoss
    before = model.patchify.weight.detach().clone()
    trainer.train()
    assert trainer.loss_fn.calls == 2 and not torch.equal(model.patchify.weight, before)
