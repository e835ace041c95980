"""LoRA on SPN's two stages: only adapter tensors change, stage 2 never touches the target side or the bank, the
optimizer holds exactly the adapters (+ modules_to_save), merged == unmerged, a reloaded adapter reproduces the
trained model, 2-process gradients equal 1-process, defaults that fit all four families."""

import json
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import TINY_TEXT, TINY_VIT, assert_same_gradients, tiny_inputs, tiny_model, two_process_gradients
from safetensors.torch import load_file

from modeling_spn4cir.loading import load_cir_model_and_processor
from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments
from trainers.lora import LoRAArguments, adapted_layers, apply_lora, lora_config_for, lora_trainable_parameters


def lora_model(stage, seed=0):
    """A tiny CLIP4CIR (ViT, Combiner) with LoRA for `stage`, adapters set to non-zero values (seeded): -> (the
    `PeftModel`, the CIR model inside it)."""
    model = tiny_model("vit", "combiner", seed=seed).eval()
    if stage == "candidate_bank":
        model.freeze_target_side()
    peft_model = apply_lora(model, LoRAArguments(lora_r=4), stage)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return peft_model, model


def _data(dataset_dir):
    return (datasets.load_dataset(str(dataset_dir), "triplets", split="train"),
            datasets.load_dataset(str(dataset_dir), "corpus", split="train"))


def _args(tmp_path, stage, **kw):
    return CIRTrainingArguments(**{**dict(
        output_dir=str(tmp_path / stage), stage=stage, per_device_train_batch_size=4, max_steps=3, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, learning_rate=1e-2, lora_r=4), **kw})


def _query(model, inputs):
    with torch.no_grad():
        return model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"],
                                      pixel_values=inputs["pixel_values"])


def _tokenized(model_dir):
    _, processor = load_cir_model_and_processor(str(model_dir))
    batch = processor.tokenizer(["make it blue", "red circle and more", "and more"], padding=True,
                                return_tensors="pt")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "pixel_values": pixels}


@pytest.mark.parametrize("stage", ["in_batch", "candidate_bank"])
def test_lora_training_changes_only_adapters_and_reloads(stage, tiny_cir_dataset, tiny_model_dir, tmp_path):
    train, corpus = _data(tiny_cir_dataset)
    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    before = load_file(tiny_model_dir / "model.safetensors")
    trainer = CIRTrainer(model, _args(tmp_path, stage), train_dataset=train, corpus=corpus, processor=processor)
    bank_before = trainer.bank.target_embeds.clone() if trainer.bank is not None else None
    trainer.train()
    trainer.save_model()
    peft_model = trainer.model

    # the optimizer holds exactly the adapters and the trained copies of modules_to_save
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in lora_trainable_parameters(peft_model)}
    # every base tensor is bit-identical; every adapter B matrix moved from its zero start
    config = peft_model.peft_config["default"]
    base_state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                  if "lora_" not in k and "modules_to_save" not in k}
    base_state = {k.replace(".original_module", ""): v for k, v in base_state.items()}
    assert set(base_state) == set(before)
    for key, value in before.items():
        assert torch.equal(base_state[key], value), key
    adapters_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert adapters_b and all(p.abs().sum() > 0 for p in adapters_b.values())
    if stage == "candidate_bank":
        # adapters only inside the query side, the bank built from (and still equal to) the frozen target side
        layers = adapted_layers(peft_model)
        assert layers and all(".text_model." in n for n in layers)
        assert config.modules_to_save == ["text_projection"]
        ids = sorted(trainer.bank.image_ids)
        pixels = processor.image_processor(trainer.images.images(ids[:4]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            fresh, _ = load_cir_model_and_processor(str(tiny_model_dir))
            expected = fresh.get_target_embeds(torch.as_tensor(pixels))
            assert torch.equal(model.get_target_embeds(torch.as_tensor(pixels)), expected)
        assert torch.equal(trainer.bank.target_embeds, bank_before)
        rows = trainer.bank.indices(ids[:4])
        torch.testing.assert_close(trainer.bank.target_embeds[rows], expected, atol=1e-6, rtol=0)
    else:
        assert any(".vision_model." in n for n in adapted_layers(peft_model))  # both towers train in stage 1

    # the saved directory is an adapter + processor + card naming the base, and reloads to the trained model
    out = tmp_path / stage
    assert {"adapter_config.json", "adapter_model.safetensors", "spn4cir_lora.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()  # the base is local: named as such, its path never in the card
    assert "| base model | a local checkpoint (not on the Hub) |" in card and str(tmp_path) not in card
    assert "| LoRA | r=" in card and "base_model" not in card.split("---")[1]
    inputs = _tokenized(out)
    peft_model.eval()
    trained = _query(peft_model, inputs)
    unmerged, _ = load_cir_model_and_processor(str(out), merge_lora=False)
    torch.testing.assert_close(_query(unmerged, inputs), trained, atol=0, rtol=0)
    merged, _ = load_cir_model_and_processor(str(out))
    assert type(merged).__name__ == "CLIP4CIRModel"
    torch.testing.assert_close(_query(merged, inputs), trained, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_merged_checkpoint_loads_without_peft(tiny_cir_dataset, tiny_model_dir, tmp_path):
    import run_cir

    common = ["--dataset", str(tiny_cir_dataset), "--do_train", "--per_device_train_batch_size", "4", "--max_steps",
              "2", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
              "--save_strategy", "no", "--lora_r", "4", "--no_dedup"]
    run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--stage", "in_batch", "--output_dir",
                  str(tmp_path / "s1"), *common])
    # stage 2 on top of the stage-1 adapter: its base is that adapter (merged), with its own adapter and --merge_lora
    results = run_cir.main(["--model_name_or_path", str(tmp_path / "s1"), "--stage", "candidate_bank",
                            "--output_dir", str(tmp_path / "s2"), "--merge_lora", *common])
    assert results["merged_checkpoint"] == str(tmp_path / "s2" / "merged")
    merged_card = (tmp_path / "s2" / "merged" / "README.md").read_text()  # its own id to load, no local path
    assert 'model="merged"' in merged_card and str(tmp_path) not in merged_card
    assert json.loads((tmp_path / "s2" / "spn4cir_lora.json").read_text())["base_model"] == str(tmp_path / "s1")
    inputs = _tokenized(tmp_path / "s2")
    adapter, _ = load_cir_model_and_processor(str(tmp_path / "s2"), merge_lora=False)
    expected = _query(adapter, inputs)
    torch.save({**inputs, "expected": expected}, tmp_path / "probe.pt")
    script = f"""
import sys
sys.modules["peft"] = None  # as if not installed: `import peft` fails, find_spec("peft") is None
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "s2" / "merged")!r}, trust_remote_code=True).eval()
probe = torch.load({str(tmp_path / "probe.pt")!r})
with torch.no_grad():
    query = model.get_query_embeds(probe["input_ids"], probe["attention_mask"], pixel_values=probe["pixel_values"])
torch.testing.assert_close(query, probe["expected"], atol=1e-5, rtol=0)
assert sys.modules["peft"] is None
print("OK", type(model).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0 and "OK CLIP4CIRModel" in result.stdout, result.stdout + result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_lora_gradients_equal_one_process(tmp_path):
    ddp = two_process_gradients("ddp_lora_gradients.py", tmp_path)
    from test_losses import global_batch, stage_loss

    for stage in ("in_batch", "candidate_bank"):
        peft_model, base = lora_model(stage)
        stage_loss(peft_model, base, global_batch(base), stage).backward()
        single = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
        assert set(single) == {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert_same_gradients(ddp[stage], single, stage)


# ------------------------------------------------------------------------------------------ all four families
def _tgcir():
    from modeling_spn4cir import TGCIRConfig, TGCIRModel

    return TGCIRModel(TGCIRConfig(text_config=dict(TINY_TEXT), projection_dim=16,
                                  vision_config={k: v for k, v in TINY_VIT.items() if k != "model_type"}))


def _blip4cir():
    from test_modeling_blip4cir import _tiny_blip_retrieval

    from modeling_spn4cir import BLIP4CIRConfig, BLIP4CIRModel

    blip = _tiny_blip_retrieval()
    return BLIP4CIRModel(BLIP4CIRConfig(text_config=blip.config.text_config.to_dict(),
                                        vision_config=blip.config.vision_config.to_dict(), embed_dim=16))


def _sprc():
    from test_modeling_sprc import _tiny_blip2

    from modeling_spn4cir import SPRCConfig, SPRCModel

    c = _tiny_blip2()
    return SPRCModel(SPRCConfig(vision_config=c.vision_config.to_dict(), qformer_config=c.qformer_config.to_dict(),
                                num_query_tokens=8, embed_dim=16))


FAMILIES = {"clip4cir-vit": lambda: tiny_model("vit", "combiner"), "clip4cir-resnet": lambda: tiny_model("resnet"),
            "tgcir": _tgcir, "blip4cir": _blip4cir, "sprc": _sprc}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_per_family(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    stage1 = lora_config_for(model, LoRAArguments(lora_r=2), "in_batch")
    model.untie_query_side()
    model.freeze_target_side()
    stage2 = lora_config_for(model, LoRAArguments(lora_r=2), "candidate_bank")
    names = {id(m): n for n, m in model.named_modules()}
    query_side = [names[id(m)] for m in model.query_side_modules().values() if isinstance(m, torch.nn.Module)]
    inside = lambda name: any(name == q or name.startswith(q + ".") for q in query_side)  # noqa: E731
    assert stage2.target_modules and all(inside(t) for t in stage2.target_modules)
    assert all(inside(m) for m in stage2.modules_to_save or [])
    attention_or_mlp = ("proj", "fc", "query", "key", "value", "dense", "qkv")  # never an embedding or a head
    assert all(any(k in t.rsplit(".", 1)[-1] for k in attention_or_mlp)
               for t in stage1.target_modules | stage2.target_modules)
    # stage 1 adapts the image tower too wherever it trains (SPRC freezes its ViT, as the original)
    vision = {t for t in stage1.target_modules if t.startswith("vision_model.")}
    assert bool(vision) == (family != "sprc")
    if family == "clip4cir-resnet":
        assert {t.rsplit(".", 1)[-1] for t in vision} == {"q_proj", "k_proj", "v_proj", "c_proj"}  # attention pool
    expected_heads = {"clip4cir-vit": {"text_projection", "combiner"}, "clip4cir-resnet": {"text_projection"},
                      "tgcir": {"text_projection", "text_fc", "tokenlearn_text", "masks_text", "s_remain_map"},
                      "blip4cir": {"text_proj"}, "sprc": None}[family]
    assert (set(stage2.modules_to_save) if stage2.modules_to_save else None) == expected_heads


@pytest.mark.parametrize("family", ["tgcir", "sprc"])
def test_stage2_lora_trains_only_adapters_and_merges(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    model.untie_query_side()
    model.freeze_target_side()
    peft_model = apply_lora(model, LoRAArguments(lora_r=2), "candidate_bank")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    inputs = tiny_inputs(model, batch=3)
    inputs["input_ids"] = inputs["input_ids"].clamp(max=90)  # inside every tiny vocabulary
    target_before = model.get_target_embeds(inputs["target_pixel_values"]).detach()
    query = peft_model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"],
                                        pixel_values=inputs["pixel_values"])
    query.sum().backward()
    graded = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded and all("lora_" in n or "modules_to_save" in n for n in graded)
    assert torch.equal(model.get_target_embeds(inputs["target_pixel_values"]), target_before)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        again = merged.get_query_embeds(inputs["input_ids"], inputs["attention_mask"],
                                        pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(again, query.detach(), atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _blip4cir().train()
        peft_model = apply_lora(model, LoRAArguments(lora_r=2), "in_batch")
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.full_like(parameter, 0.05))
        if checkpointing:  # what Trainer(gradient_checkpointing=True) calls
            peft_model.activation_checkpointing_enable()
        inputs = tiny_inputs(model, batch=3)
        inputs["input_ids"] = inputs["input_ids"].clamp(max=110)
        model.eval()  # no dropout: both passes compute the same function
        calls = []
        if checkpointing:
            for module in model.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.training = True  # checkpointing only acts in training mode; dropout below stays off
                    inner = module._gradient_checkpointing_func
                    module._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
        out = peft_model(**inputs)
        out.logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
        assert bool(calls) == checkpointing
    assert set(grads[0]) == set(grads[1]) and any("vision_model" in n and "lora_A" in n for n in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_bad_lora_options_name_the_fix():
    model = tiny_model("vit", "combiner")
    model.freeze_target_side()
    with pytest.raises(ValueError, match="'vision_model.encoder.layers.0.mlp.fc1' names no module that trains"):
        lora_config_for(model, LoRAArguments(lora_r=2, lora_target_modules=["vision_model.encoder.layers.0.mlp.fc1"]),
                        "candidate_bank")
    config = lora_config_for(model, LoRAArguments(lora_r=2, lora_target_modules=["q_proj"],
                                                  lora_modules_to_save=["combiner"]), "candidate_bank")
    assert config.target_modules == {f"text_model.encoder.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert config.modules_to_save == ["combiner"]
    with pytest.raises(ValueError, match="need --lora_r"):
        LoRAArguments(lora_modules_to_save=["combiner"])
