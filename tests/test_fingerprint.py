"""The one target-side fingerprint: the candidate bank, the gallery index and the evaluator's bank reuse compare the
same thing, so a model whose target side changed is refused by all three and one whose query side changed (an SPN
stage-2 model) is accepted by all three; dtypes count, the image processor's class name does not; the cached hash
follows in-place updates; TG-CIR's and SPRC's stage-2 preparation and LoRA adapters keep the target side's
fingerprint."""

import copy
import logging

import datasets
import torch
from conftest import solid_images, tiny_model, tiny_tokenizer

import modeling_spn4cir.storage.fingerprint as fingerprint_module
from modeling_spn4cir import CLIP4CIRImageProcessor, TGCIRConfig, TGCIRModel
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.retrieval import CIRIndex, ModelMismatchError, model_fingerprint
from modeling_spn4cir.storage import target_side_fingerprint
from trainers.candidate_bank import load_or_build_candidate_bank
from trainers.evaluation import CIREvaluator

IDS = [f"c{i}" for i in range(6)]


def _counting(model):
    """`model`, recording in `model.encoded` how many images its image side encodes (bank, evaluator)."""
    encode = model.get_target_embeds_and_reference_features
    model.encoded = []
    model.get_target_embeds_and_reference_features = lambda pixels: model.encoded.append(len(pixels)) or encode(pixels)
    return model


def _bank(model, processor, corpus, bank_dir):
    return load_or_build_candidate_bank(model, ImageStore(corpus), IDS, processor, bank_dir=bank_dir, batch_size=4,
                                        show_progress_bar=False, shard_size=3)


def _verdicts(model, processor, corpus, triplets, bank_dir, bank, index) -> tuple[bool, bool, bool]:
    """(is the stored bank reused, does the index accept the model, does the evaluator reuse `bank`) for `model`."""
    model = _counting(model)
    _bank(model, processor, corpus, bank_dir)
    bank_reused = model.encoded == []
    try:
        index.check_model(model, processor)
        index_accepts = True
    except ModelMismatchError:
        index_accepts = False
    evaluator = CIREvaluator(corpus, triplets, processor, tiny_tokenizer(), show_progress_bar=False)
    evaluator.use_bank(bank)
    model.encoded.clear()
    evaluator(model)
    return bank_reused, index_accepts, model.encoded == []


def test_bank_index_and_evaluator_agree(tmp_path, caplog):
    model = tiny_model("vit", "sum").eval()
    processor = CLIP4CIRImageProcessor(size=32)
    corpus = datasets.Dataset.from_dict({"image_id": IDS, "image": solid_images(6)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    triplets = datasets.Dataset.from_dict({"reference_id": IDS[:3], "target_id": IDS[3:],
                                           "modification_texts": [["make it blue"]] * 3})
    bank = _bank(model, processor, corpus, tmp_path / "bank")
    index = CIRIndex.build(model, processor, corpus, show_progress_bar=False)
    ours = target_side_fingerprint(model, processor)  # the three hold the same fingerprint
    assert {k: bank.fingerprint[k] for k in ours} == ours and {k: index.fingerprint[k] for k in ours} == ours
    args = (corpus, triplets, tmp_path / "bank", bank, index)

    # an SPN stage-2 model: its query side trained, its target side the same -> accepted by all three
    stage2 = copy.deepcopy(model)
    with torch.no_grad():
        for p in stage2.query_side_parameters():
            p.add_(0.1)
    assert _verdicts(stage2, processor, *args) == (True, True, True)

    # another target side: refused by all three (the bank is rebuilt, naming what changed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.visual_projection.weight.mul_(2.0)
    with caplog.at_level(logging.WARNING):
        assert _verdicts(other, processor, *args) == (False, False, False)
    assert "target_side_weights changed" in caplog.text

    # another image preprocessing: refused by all three too
    resized = CLIP4CIRImageProcessor(size=32, preprocessing="resize")
    assert _verdicts(copy.deepcopy(model), resized, *args) == (False, False, False)


def test_dtypes_count_and_processor_class_names_do_not():
    class Towers(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.register_buffer("w", torch.zeros(4, dtype=dtype))  # the same bytes in both dtypes

        def target_side_state_dict(self):
            return self.state_dict()

    processor = CLIP4CIRImageProcessor(size=32)
    fp32 = target_side_fingerprint(Towers(torch.float32), processor)
    int32 = target_side_fingerprint(Towers(torch.int32), processor)
    assert fp32["target_side_weights"] != int32["target_side_weights"]

    class RenamedImageProcessor(CLIP4CIRImageProcessor):
        pass

    renamed = RenamedImageProcessor(size=32)
    assert renamed.to_dict()["image_processor_type"] != processor.to_dict()["image_processor_type"]
    model = tiny_model()
    assert target_side_fingerprint(model, renamed) == target_side_fingerprint(model, processor)
    assert model_fingerprint(model, renamed) == model_fingerprint(model, processor)


def test_the_cached_hash_follows_in_place_updates(monkeypatch):
    model, processor = tiny_model(), CLIP4CIRImageProcessor(size=32)
    hashed = []
    original = fingerprint_module._tensor_bytes
    monkeypatch.setattr(fingerprint_module, "_tensor_bytes", lambda t: hashed.append(1) or original(t))
    first = target_side_fingerprint(model, processor)
    count = len(hashed)
    assert count and target_side_fingerprint(model, processor) == first and len(hashed) == count  # cached
    with torch.no_grad():
        model.visual_projection.weight.mul_(2.0)  # bumps the tensor's version
    second = target_side_fingerprint(model, processor)
    assert second != first
    model.visual_projection.weight.data.mul_(0.5)  # bypasses versions (as fused optimizers do): seen by its values
    assert target_side_fingerprint(model, processor) == first


def test_stage2_preparation_keeps_the_target_side_fingerprint(tmp_path):
    """TG-CIR unties its token learner for stage 2 (the text side gets a copy): the target side is unchanged.
    SPRC's stage 2 adds a query-side copy of its Q-Former: training that copy keeps the fingerprint."""
    processor = CLIP4CIRImageProcessor(size=32)
    torch.manual_seed(0)
    tgcir = TGCIRModel(TGCIRConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    max_position_embeddings=16, projection_dim=16),
                                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=32, patch_size=8,
                                                      projection_dim=16),
                                   projection_dim=16, tie_query_side=True))
    stage1 = target_side_fingerprint(tgcir, processor)
    tgcir.untie_query_side()
    tgcir.freeze_target_side()
    assert not tgcir.config.tie_query_side
    assert target_side_fingerprint(tgcir, processor) == stage1

    from test_modeling_sprc import _tiny_blip2
    from transformers import Blip2ForImageTextRetrieval

    from modeling_spn4cir import SPRCModel

    Blip2ForImageTextRetrieval(_tiny_blip2()).save_pretrained(tmp_path / "blip2")
    sprc = SPRCModel.from_blip2(str(tmp_path / "blip2"))
    whole = dict(sprc.state_dict())  # stage 1 has no query-side copy yet: everything is its target side
    sprc.untie_query_side()
    sprc.freeze_target_side()
    assert set(sprc.target_side_state_dict()) == set(whole)
    prepared = target_side_fingerprint(sprc, processor)
    with torch.no_grad():
        for p in sprc.query_side_parameters():
            p.add_(0.1)
    assert target_side_fingerprint(sprc, processor) == prepared


def test_a_lora_stage2_model_has_its_base_models_fingerprint():
    """Stage-2 adapters live on the query side: the PEFT model keeps the bank and the index of its base model."""
    from trainers.lora import LoRAArguments, apply_lora

    processor = CLIP4CIRImageProcessor(size=32)
    base = target_side_fingerprint(tiny_model(), processor)
    model = tiny_model()
    model.freeze_target_side()
    peft_model = apply_lora(model, LoRAArguments(lora_r=2), "candidate_bank")
    assert type(peft_model).__name__ == "PeftModel"
    assert target_side_fingerprint(peft_model, processor) == base
