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


# ------------------------------------------------------------------------------------ the contract, every family
def _family_inputs(model, batch=2, length=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 90, (batch, length), generator=g)
    size = model.config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g),
            "target_pixel_values": torch.randn(batch, 3, size, size, generator=g)}


@pytest.fixture(params=["clip4cir-vit", "clip4cir-resnet", "tgcir", "blip4cir", "sprc"])
def family_model(request):
    from test_lora import FAMILIES

    torch.manual_seed(0)
    return request.param, FAMILIES[request.param]().eval()


def test_forward_rejects_a_misspelled_argument(family_model):
    _, model = family_model
    inputs = _family_inputs(model)
    with torch.no_grad():
        assert model(**inputs).logits.shape == (2, 2)
        with pytest.raises(TypeError, match="target_pixel_value"):
            model(**{k: v for k, v in inputs.items() if k != "target_pixel_values"},
                  target_pixel_value=inputs["target_pixel_values"])


def test_stage2_preparation_is_one_step_and_freezing_changes_no_module(family_model):
    name, model = family_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.untie_query_side()
    untied = set(model.state_dict())
    assert (untied != set(before)) == (name == "sprc")  # only SPRC adds modules (its caption-side Q-Former copy)
    assert getattr(model.config, "tie_query_side", False) is False
    model.freeze_target_side()
    assert set(model.state_dict()) == untied and all(torch.equal(before[k], v) for k, v in model.state_dict().items()
                                                     if k in before)
    query_side = {id(p) for p in model.query_side_parameters()}
    assert all(p.requires_grad == (id(p) in query_side) for p in model.parameters())
    model.train()
    frozen = [m for m in model.children() if not any(id(p) in query_side for p in m.parameters())]
    assert frozen and not any(m.training for m in frozen)  # the target side stays in eval mode
    model.unfreeze_target_side()
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in trainable} == trainable
    model.train()
    assert model.vision_model.training == (name not in ("clip4cir-vit", "clip4cir-resnet"))  # CLIP4Cir: CLIP in eval


def test_is_cir_model_does_not_depend_on_one_class_object(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from modeling_spn4cir import CIRModelMixin, CLIP4CIRModel, is_cir_model
    from test_lora import FAMILIES

    models = {name: build() for name, build in FAMILIES.items()}
    assert all(is_cir_model(m) for m in models.values()) and not is_cir_model(CLIPModel(CLIPConfig()))
    mixins = {next(c for c in type(m).__mro__ if c.__name__ == "CIRModelMixin") for m in models.values()}
    assert len(mixins) == 4 and CIRModelMixin not in mixins  # one copy per family folder, none the canonical one
    models["clip4cir-vit"].save_pretrained(tmp_path / "clip4cir")
    # the code `trust_remote_code` runs: the saved directory's own files (the package would win in AutoModel here)
    remote_class = get_class_from_dynamic_module("modeling_clip4cir.CLIP4CIRModel", str(tmp_path / "clip4cir"))
    remote = remote_class.from_pretrained(tmp_path / "clip4cir")
    assert remote_class is not CLIP4CIRModel and not isinstance(remote, CIRModelMixin) and is_cir_model(remote)


def test_text_and_image_only_queries_are_contract_methods(family_model):
    name, model = family_model
    inputs = _family_inputs(model)
    with torch.no_grad():
        if name == "clip4cir-resnet":  # sum fusion: the normalized text feature
            text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
            torch.testing.assert_close(model.get_text_query_embeds(inputs["input_ids"], inputs["attention_mask"]),
                                       torch.nn.functional.normalize(text, dim=-1))
        else:  # the Combiner (clip4cir-vit) and the token fusions need the reference image
            with pytest.raises(ValueError, match="cannot compose a query without a reference image"):
                model.get_text_query_embeds(inputs["input_ids"], inputs["attention_mask"])
        if name == "sprc":
            with pytest.raises(ValueError, match="multi-vector targets"):
                model.get_image_query_embeds(inputs["pixel_values"])
        else:
            torch.testing.assert_close(model.get_image_query_embeds(inputs["pixel_values"]),
                                       model.get_target_embeds(inputs["pixel_values"]))


def test_configs_saved_before_tie_query_side_load_as_they_were(tmp_path):
    import json

    from transformers import AutoModel

    from modeling_spn4cir import SPRCConfig, TGCIRConfig
    from test_lora import FAMILIES

    assert TGCIRConfig.from_dict({"share_token_learner": True}).tie_query_side is True
    assert TGCIRConfig.from_dict({"share_token_learner": False}).tie_query_side is False
    assert SPRCConfig.from_dict({"separate_query_qformer": False}).tie_query_side is True
    model = FAMILIES["sprc"]()
    model.untie_query_side()
    model.save_pretrained(tmp_path / "sprc")
    config = json.loads((tmp_path / "sprc" / "config.json").read_text())
    config["separate_query_qformer"] = not config.pop("tie_query_side")  # how a stage-2 SPRC config used to say it
    (tmp_path / "sprc" / "config.json").write_text(json.dumps(config))
    old = AutoModel.from_pretrained(tmp_path / "sprc")
    assert old.qformer_query is not None and not old.config.tie_query_side
    torch.testing.assert_close(old.qformer_query.text_projection.weight, model.qformer_query.text_projection.weight)


def test_a_preprocessor_config_of_the_old_image_processor_file_loads(tmp_path):
    import json

    from transformers import AutoImageProcessor

    # what processors saved while the class lived in clip4cir/image_processing_clip4cir.py wrote
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIP4CIRImageProcessor", "preprocessing": "resize", "size": 48, "target_ratio": 1.25,
        "auto_map": {"AutoImageProcessor": "image_processing_clip4cir.CLIP4CIRImageProcessor"}}))
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CLIP4CIRImageProcessor) and (loaded.preprocessing, loaded.size) == ("resize", 48)


def test_an_unknown_stage1_loss_names_the_family_s_objectives():
    from trainers.losses import stage1_loss_for
    from test_lora import FAMILIES

    model = FAMILIES["tgcir"]()
    model.config.stage1_loss = "tgcri"
    with pytest.raises(ValueError, match=r"stage-1 loss 'tgcri'.*\['in_batch_infonce', 'tgcir'\]"):
        stage1_loss_for(model, 0.02)


def test_truncated_model_file_is_named_with_the_fix(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=rf"Cannot read {weights}:.*truncated.*re-download.*re-convert"):
        load_cir_model_and_processor(str(tiny_model_dir))
