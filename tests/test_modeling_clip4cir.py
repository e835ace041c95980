"""CLIP4CIR model family: the CIR model contract, stage-2 freezing, serialization, Hub readiness, and the original's
train mode (CLIP towers in eval mode during training: ResNet BatchNorm statistics stay; the Combiner's dropout
follows train mode)."""

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, TINY_VIT, run_without_package, tiny_config, tiny_inputs, tiny_model, tiny_tokenizer
from PIL import Image
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel

import modeling_spn4cir  # noqa: F401  (registers the Auto classes)
from modeling_spn4cir import CLIP4CIRConfig, CLIP4CIRModel, CLIP4CIRResNetConfig


def _unit_norm(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


def test_contract_shapes_and_normalization(tower_fusion):
    tower, fusion = tower_fusion
    model = tiny_model(tower, fusion).eval()
    inputs = tiny_inputs(model, batch=3)
    with torch.no_grad():
        target = model.get_target_embeds(inputs["target_pixel_values"])
        reference = model.get_reference_features(inputs["pixel_values"])
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"], reference_features=reference)
        query_from_pixels = model.get_query_embeds(
            inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        )
        out = model(**inputs)
    assert target.shape == (3, 16) and _unit_norm(target)
    assert reference.shape == (3, 16) and not _unit_norm(reference)  # the fusion consumes raw features
    assert query.shape == (3, 16) and _unit_norm(query)
    torch.testing.assert_close(query, query_from_pixels)
    torch.testing.assert_close(out.query_embeds, query)
    torch.testing.assert_close(out.target_embeds, target)
    torch.testing.assert_close(out.logits, query @ target.T / model.config.temperature)
    assert out.loss is None  # losses are trainers.losses modules, never computed inside the model


def test_sum_fusion_is_normalized_sum():
    model = tiny_model("vit", "sum").eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        image = model.get_image_features(inputs["pixel_values"])
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(query, F.normalize(image + text, dim=-1))


def test_forward_without_targets_has_no_logits():
    model = tiny_model().eval()
    inputs = tiny_inputs(model)
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert out.loss is None and out.logits is None and out.query_embeds.shape == (3, 16)


def test_temperature_scales_logits():
    inputs = tiny_inputs(tiny_model())
    a = tiny_model(temperature=0.02).eval()(**inputs).logits
    b = tiny_model(temperature=0.01).eval()(**inputs).logits
    torch.testing.assert_close(b, 2 * a)


def test_stage2_freeze_leaves_vision_grads_none(tower_fusion):
    tower, fusion = tower_fusion
    model = tiny_model(tower, fusion)
    model.freeze_target_side()
    model.train()
    assert not model.vision_model.training  # BatchNorm statistics cannot move in stage 2
    inputs = tiny_inputs(model)
    with torch.no_grad():
        bank = model.get_target_embeds(inputs["target_pixel_values"])
        reference = model.get_reference_features(inputs["pixel_values"])
    out = model(input_ids=inputs["input_ids"], reference_features=reference, target_embeds=bank)
    F.cross_entropy(out.logits, torch.arange(len(bank))).backward()
    query_ids = {id(p) for p in model.query_side_parameters()}
    for name, p in model.named_parameters():
        if id(p) in query_ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    names = {n for n, p in model.named_parameters() if id(p) in query_ids}
    assert any(n.startswith("text_model.") for n in names) and "text_projection.weight" in names
    assert any(n.startswith("combiner.") for n in names) == (fusion == "combiner")
    assert not any(n.startswith(("vision_model.", "visual_projection")) for n in names)


def test_save_load_identical_outputs(tmp_path, tower_fusion):
    tower, fusion = tower_fusion
    model = tiny_model(tower, fusion).eval()
    inputs = tiny_inputs(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CLIP4CIRModel) and loaded.config.vision_tower == tower
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(a.query_embeds, b.query_embeds, rtol=0, atol=0)
    torch.testing.assert_close(a.target_embeds, b.target_embeds, rtol=0, atol=0)


def test_resnet_geometry_is_configurable():
    small = CLIP4CIRResNetConfig(layers=[1, 1, 1, 1], width=8, image_size=64, projection_dim=16)
    deep = CLIP4CIRResNetConfig(layers=[2, 3, 1, 2], width=16, image_size=96, projection_dim=16)
    assert small.num_attention_heads == 4 and deep.num_attention_heads == 8  # width * 32 // 64
    model = CLIP4CIRModel(CLIP4CIRConfig(text_config=TINY_TEXT, vision_config=deep, projection_dim=16))
    assert [len(getattr(model.vision_model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 3, 1, 2]
    assert model.vision_model.attnpool.positional_embedding.shape == (3 * 3 + 1, 16 * 32)
    assert model.get_target_embeds(torch.randn(2, 3, 96, 96)).shape == (2, 16)
    with pytest.raises(Exception, match="multiple of 32"):
        CLIP4CIRResNetConfig(image_size=100)


def test_auto_config_for_model_and_roundtrip():
    config = AutoConfig.for_model("clip4cir", text_config=TINY_TEXT, vision_config=TINY_VIT, projection_dim=16)
    assert isinstance(config, CLIP4CIRConfig)
    again = CLIP4CIRConfig.from_dict(tiny_config("resnet", "combiner").to_dict())
    assert isinstance(again.vision_config, CLIP4CIRResNetConfig) and again.fusion == "combiner"
    with pytest.raises(Exception, match="fusion"):
        tiny_config(fusion="concat")


def test_reference_feature_dimension_mismatch_is_a_clear_error():
    model = tiny_model()
    inputs = tiny_inputs(model)
    with pytest.raises(ValueError, match="dimension 8.*expects 16"):
        model.get_query_embeds(inputs["input_ids"], reference_features=torch.randn(3, 8))


def test_from_clip_copies_weights(tmp_path):
    torch.manual_seed(0)
    text = {k: v for k, v in TINY_TEXT.items()}
    vision = {k: v for k, v in TINY_VIT.items() if k != "model_type"}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    model = CLIP4CIRModel.from_clip(str(tmp_path / "clip"), fusion="sum", temperature=0.05).eval()
    assert model.config.temperature == 0.05 and model.config.projection_dim == 16
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected_image = clip.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        expected_text = clip.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        torch.testing.assert_close(model.get_image_features(inputs["pixel_values"]), expected_image)
        torch.testing.assert_close(model.get_text_features(inputs["input_ids"]), expected_text)
    combiner = CLIP4CIRModel.from_clip(str(tmp_path / "clip"), fusion="combiner")
    assert combiner.combiner is not None


def test_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model("resnet", "combiner").eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).query_embeds
    model.save_pretrained(tmp_path / "model")
    torch.save({k: v for k, v in inputs.items()} | {"expected": expected}, tmp_path / "io.pt")
    stdout = run_without_package(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(r"{tmp_path / 'model'}", trust_remote_code=True).eval()
        assert "modeling_spn4cir" not in type(model).__module__, type(model).__module__
        io = torch.load(r"{tmp_path / 'io.pt'}", weights_only=True)
        expected = io.pop("expected")
        with torch.no_grad():
            got = model(**io).query_embeds
        assert torch.equal(got, expected), (got - expected).abs().max()
        print("OK", type(model).__name__)
        """,
        tmp_path,
    )
    assert "OK CLIP4CIRModel" in stdout


def _rn_model_dir(tmp_path, **config):
    from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRProcessor

    model = tiny_model("resnet", "sum", **config)
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 3  # the tiny tokenizer's <eot>
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=64),
                                  tokenizer=tiny_tokenizer(["make it blue", "red circle", "and more"]))
    return model, processor


def _batchnorm_buffers(model):
    return {n: b.clone() for n, b in model.vision_model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("clip_train_mode", [False, True])
def test_stage1_step_keeps_resnet_batchnorm_statistics(tiny_cir_dataset, tmp_path, clip_train_mode):
    from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

    model, processor = _rn_model_dir(tmp_path, clip_train_mode=clip_train_mode)
    train = datasets.load_dataset(str(tiny_cir_dataset), "triplets", split="train")
    corpus = datasets.load_dataset(str(tiny_cir_dataset), "corpus", split="train")
    pixels = processor.image_processor([Image.new("RGB", (40, 40), (200, 30, 30))], return_tensors="pt")["pixel_values"]
    stats = _batchnorm_buffers(model)
    assert stats
    conv = model.vision_model.conv1.weight.clone()
    args = CIRTrainingArguments(output_dir=str(tmp_path / "out"), stage="in_batch", per_device_train_batch_size=4,
                                max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
                                save_strategy="no")
    CIRTrainer(model, args, train_dataset=train, corpus=corpus, processor=processor).train()
    assert not torch.equal(model.vision_model.conv1.weight, conv)  # the step did train the image tower
    after = _batchnorm_buffers(model)
    unchanged = all(torch.equal(stats[n], after[n]) for n in stats)
    model.train()
    with torch.no_grad():
        in_train_mode = model.get_target_embeds(pixels)
        model.eval()
        in_eval_mode = model.get_target_embeds(pixels)
    if clip_train_mode:  # the option: BatchNorm in training mode moves its statistics and uses batch ones
        assert not unchanged and not torch.equal(in_train_mode, in_eval_mode)
    else:  # the original (CLIP4Cir's clip_model.eval())
        assert unchanged
        assert torch.equal(in_train_mode, in_eval_mode)


def test_combiner_dropout_still_follows_train_mode():
    model = tiny_model("resnet", "combiner").train()
    assert model.combiner.training and not model.vision_model.training and not model.text_model.training
