"""TG-CIR family: parity of converted original checkpoints (SPN4CIR stage 2 and TG-CIR stage 1) with the outputs of
the original code, the stage-1 objective, the stage-2 bank loss and gradient set, freezing, conversion errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import parity_fixture, run_without_package, tiny_tokenizer
from transformers import AutoModel, AutoProcessor, CLIPConfig, CLIPModel

import modeling_spn4cir  # noqa: F401  (registers the Auto classes)
from modeling_spn4cir import TGCIRConfig, TGCIRModel, TGCIRProcessor
from modeling_spn4cir.conversion_utils import CheckpointMismatchError
from modeling_spn4cir.convert_original_checkpoint import detect_family
from modeling_spn4cir.convert_original_checkpoint import main as dispatcher_main
from modeling_spn4cir.openai_clip_conversion import convert_openai_clip_entry
from modeling_spn4cir.tgcir.convert_tgcir_original_checkpoint import (
    convert_original_checkpoint, load_original_model, parse_num_heads, read_original_checkpoint)
from modeling_spn4cir.tgcir.losses_tgcir import TGCIRStage1Loss

PARITY, META, TOL = parity_fixture("parity_tgcir")
GEOMETRY = META["geometry"]
HEADS = {"text": GEOMETRY["transformer_heads"], "vision": META["derived"]["vision_heads"]}
STAGE1_TERMS = ("stu_rank", "tea_rank", "tea_mask", "ortho", "ckd", "kl")
CHECKPOINTS = {"stage2": "spn4cir_tgcir_stage2.pt", "stage1": "spn4cir_tgcir_stage1.pt"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both original formats converted to directories and reloaded through AutoModel."""
    out = {}
    for name, checkpoint in CHECKPOINTS.items():
        directory = convert_original_checkpoint(PARITY / checkpoint, tmp_path_factory.mktemp(name) / "model",
                                                num_heads=HEADS)
        out[name] = (directory, AutoModel.from_pretrained(directory).eval())
    return out


def _stage2_outputs(model, inputs, expected):
    """Every non-stage-1 tensor of expected.safetensors, computed through the model's public methods."""
    got = {}
    with torch.no_grad():
        for prefix, key in (("ref", "reference_pixel_values"), ("target", "target_pixel_values"),
                            ("extra", "bank_extra_pixel_values")):
            tokens, details = model.encode_image(inputs[key], output_details=True)
            target_embeds, reference = model.get_target_embeds_and_reference_features(inputs[key])
            torch.testing.assert_close(reference, tokens, rtol=0, atol=0)
            torch.testing.assert_close(target_embeds, model.pool_tokens(tokens), rtol=0, atol=0)
            got.update({
                f"{prefix}_clip_vision_last_hidden": details["vision_last_hidden"],
                f"{prefix}_clip_image_embeds": details["image_embeds"],
                f"{prefix}_fc_tokens": details["image_fc_tokens"],
                f"{prefix}_tokenlearner_weights": details["image_tokenlearner_weights"],
                f"{prefix}_tokens": model.get_reference_features(inputs[key]),
                f"{prefix}_features": model.get_target_embeds(inputs[key]),
            })
        text_tokens, details = model.encode_text(inputs["input_ids"], output_details=True)
        got.update({
            "text_clip_last_hidden": details["text_last_hidden"],
            "text_clip_text_embeds": details["text_embeds"],
            "text_fc_tokens": details["text_fc_tokens"],
            "text_tokenlearner_weights": details["text_tokenlearner_weights"],
            "text_tokens": text_tokens,
            "remain_mask": model.get_remain_mask(got["ref_tokens"], text_tokens),
        })
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["reference_pixel_values"],
                    target_pixel_values=inputs["target_pixel_values"])
        got["query_features"] = out.query_embeds
        got["scores"] = model.similarity(out.query_embeds, out.target_embeds)
        torch.testing.assert_close(out.logits, got["scores"] / model.config.temperature)
        bank = torch.cat([got["target_features"], got["extra_features"]])
        got["bank_target_features"] = bank
        # Stage 2 reads the reference tokens from the bank, never the pixels.
        query = model.get_query_embeds(inputs["input_ids"], reference_features=got["ref_tokens"])
        got["scores_bank"] = model.similarity(query, bank)
        labels = expected["stage2_bank_labels"]
        all_images = torch.cat([bank, got["ref_features"]])
        for tau in (META["temperatures"]["stage2_tau_cirr"], META["temperatures"]["stage2_tau_fiq"]):
            got[f"stage2_bank_loss_tau{tau}"] = F.cross_entropy(model.similarity(query, bank) / tau, labels)[None]
            got[f"stage2_bank_loss_allimg_tau{tau}"] = F.cross_entropy(
                model.similarity(query, all_images) / tau, labels)[None]
    got["sorted_indices"] = torch.argsort(1 - got["scores"], dim=1)
    got["sorted_indices_bank"] = torch.argsort(1 - got["scores_bank"], dim=1)
    return got


def _stage1_outputs(model, inputs):
    loss_fn = TGCIRStage1Loss.from_config(model.config, temperature=0.02)  # the trainer's tau does not apply
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["reference_pixel_values"],
                    target_pixel_values=inputs["target_pixel_values"], **loss_fn.model_kwargs)
        terms = loss_fn.compute_terms(out)
        total = loss_fn(out)
    got = {f"stage1_loss_{name}": terms[name].reshape(1) for name in STAGE1_TERMS}
    got.update({
        "stage1_loss_total": total.reshape(1),
        "stage1_s_remain_mask": out.remain_mask,
        "stage1_t_remain_mask": out.teacher_remain_mask,
        "stage1_t_replace_mask": out.teacher_replace_mask,
        "stage1_query_features": out.query_embeds,
        "stage1_target_features": out.target_embeds,
        "stage1_scores": model.similarity(out.query_embeds, out.target_embeds),
    })
    return got


def _assert_all(got, expected, keys):
    for key in keys:
        assert got[key].shape == expected[key].shape, key
        if expected[key].dtype == torch.int64:
            assert torch.equal(got[key], expected[key]), key
        else:
            torch.testing.assert_close(got[key], expected[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


def test_every_expected_tensor_from_both_formats(converted, inputs, expected):
    stage2_keys = [k for k in expected if not k.startswith("stage1_") and k != "stage2_bank_labels"]
    stage1_keys = [k for k in expected if k.startswith("stage1_")]
    assert len(stage2_keys) + len(stage1_keys) + 1 == len(expected) == 48
    _assert_all(_stage2_outputs(converted["stage2"][1], inputs, expected), expected, stage2_keys)
    _assert_all(_stage1_outputs(converted["stage1"][1], inputs), expected, stage1_keys)
    for name in STAGE1_TERMS + ("total",):
        assert abs(expected[f"stage1_loss_{name}"].item() - META["scalars"][f"stage1_loss_{name}"]) < 1e-6


def test_stage1_checkpoint_text_side_copies_image_side(converted):
    stage1, stage2 = converted["stage1"][1], converted["stage2"][1]
    for image, text in ((stage1.tokenlearn, stage1.tokenlearn_text), (stage1.masks, stage1.masks_text)):
        for (_, a), (_, b) in zip(image.state_dict().items(), text.state_dict().items()):
            assert torch.equal(a, b)
    # stage 2 holds its own (trained) copies, which differ
    assert not torch.equal(stage2.masks.weight, stage2.masks_text.weight)
    original = torch.load(PARITY / CHECKPOINTS["stage1"], weights_only=True)["state_dict"]
    assert torch.equal(stage1.stage1_logit_scale, original["loss_T"].reshape(-1))
    assert read_original_checkpoint(PARITY / CHECKPOINTS["stage1"]).source_format == "tgcir_stage1"
    assert read_original_checkpoint(PARITY / CHECKPOINTS["stage2"]).source_format == "spn4cir_stage2"


def test_inferred_geometry_and_head_rule():
    model, _ = load_original_model(PARITY / CHECKPOINTS["stage2"], num_heads=["text=2", "vision=1"])
    config = model.config
    assert config.vision_config.hidden_size == GEOMETRY["vision_width"]
    assert config.vision_config.num_hidden_layers == GEOMETRY["vision_layers"]
    assert config.vision_config.patch_size == GEOMETRY["vision_patch_size"]
    assert config.image_size == GEOMETRY["image_resolution"]
    assert config.text_config.vocab_size == GEOMETRY["vocab_size"]
    assert config.text_config.max_position_embeddings == GEOMETRY["context_length"]
    assert config.text_config.num_hidden_layers == GEOMETRY["transformer_layers"]
    assert config.text_config.num_attention_heads == GEOMETRY["transformer_heads"]
    assert config.projection_dim == GEOMETRY["embed_dim"]
    assert (config.num_global_tokens, config.num_local_tokens) == (GEOMETRY["global_token_num_P"],
                                                                   GEOMETRY["local_token_num_Q"])
    default, _ = load_original_model(PARITY / CHECKPOINTS["stage2"])  # width // 64, OpenAI's rule
    assert default.config.text_config.num_attention_heads == GEOMETRY["transformer_width"] // 64
    assert default.config.vision_config.num_attention_heads == GEOMETRY["vision_width"] // 64
    assert parse_num_heads(["vision=12", "text=8"]) == {"vision": 12, "text": 8}
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        parse_num_heads(["audio=2"])
    with pytest.raises(ValueError, match="TOWER=N"):
        parse_num_heads(["8"])
    with pytest.raises(CheckpointMismatchError, match="--num_heads text=N"):
        load_original_model(PARITY / CHECKPOINTS["stage2"], num_heads={"text": 3})


def test_text_tower_ignores_the_padding_mask(converted, inputs, expected):
    """The original attends over padding and averages it in: an attention mask must not change anything."""
    model = converted["stage2"][1]
    ids = inputs["input_ids"]
    mask = (torch.arange(ids.shape[1])[None] <= torch.tensor(META["token_ids"]["eot_positions"])[:, None]).long()
    with torch.no_grad():
        with_mask = model.get_query_embeds(ids, mask, pixel_values=inputs["reference_pixel_values"])
        shorter = model.get_query_embeds(ids[:, :30], pixel_values=inputs["reference_pixel_values"])
    torch.testing.assert_close(with_mask, expected["query_features"], **TOL)
    assert (shorter - expected["query_features"]).abs().max() > 1e-3  # padding length is part of the input


def _hf_names(original_names):
    """Original parameter names -> this model's names (in_proj split into q/k/v)."""
    out = set()
    for name in original_names:
        if name.startswith("backbone.clip."):
            key = name[len("backbone.clip."):]
            m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
            if m:
                tower = "vision_model" if m.group(1) else "text_model"
                out |= {f"{tower}.encoder.layers.{m.group(2)}.self_attn.{p}.{m.group(3)}"
                        for p in ("q_proj", "k_proj", "v_proj")}
            else:
                out |= set(convert_openai_clip_entry(key, torch.zeros(1)))
        else:
            out.add(name.removeprefix("backbone."))
    return out


def test_stage2_gradient_set_and_frozen_vision_side(inputs, expected):
    model, _ = load_original_model(PARITY / CHECKPOINTS["stage1"], num_heads=HEADS)  # stage 2 starts here
    model.freeze_target_side()
    model.train()
    assert not model.vision_model.training and not model.tokenlearn.training
    expected_names = _hf_names(META["stage2_params_receiving_grad_from_bank_loss"])
    query_ids = {id(p) for p in model.query_side_parameters()}
    assert {n for n, p in model.named_parameters() if id(p) in query_ids} == expected_names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_names
    with torch.no_grad():
        bank, reference = model.get_target_embeds_and_reference_features(
            torch.cat([inputs["target_pixel_values"], inputs["bank_extra_pixel_values"]]))
        reference = model.get_reference_features(inputs["reference_pixel_values"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.query_side_parameters(), lr=1e-3, eps=1e-7)
    query = model(input_ids=inputs["input_ids"], reference_features=reference).query_embeds
    loss = F.cross_entropy(model.similarity(query, bank) / META["temperatures"]["stage2_tau_fiq"],
                           expected["stage2_bank_labels"])
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == expected_names
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in expected_names), name


def test_stage1_loss_trains_both_sides_and_teacher_detaches(converted, inputs):
    model, _ = load_original_model(PARITY / CHECKPOINTS["stage1"], num_heads=HEADS)
    loss_fn = TGCIRStage1Loss()
    batch = {"input_ids": inputs["input_ids"], "pixel_values": inputs["reference_pixel_values"],
             "target_pixel_values": inputs["target_pixel_values"]}
    out = model(**batch, **loss_fn.model_kwargs)
    loss_fn(out).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for name in ("stage1_logit_scale", "local_weight", "t_remain_map.0.weight", "t_replace_map.0.weight",
                 "s_remain_map.0.weight", "fc.weight", "text_fc.weight", "visual_projection.weight",
                 "text_projection.weight", "masks.weight"):
        assert name in grads, name
    model.zero_grad()
    out = model(**batch, **loss_fn.model_kwargs)
    loss_fn.compute_terms(out)["tea_mask"].backward()  # teacher masks see detached reference / text tokens
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.text_model.parameters())
    assert model.vision_model.embeddings.class_embedding.grad.abs().sum() > 0  # target tokens are not detached
    fixed = TGCIRStage1Loss(temperature=0.05, mu_=0.0)
    with torch.no_grad():
        out = model(**batch, **fixed.model_kwargs)
        terms, total = fixed.compute_terms(out), fixed(out)
        # duplicate targets are masked out of the negatives of the ranking terms only
        masked = loss_fn.compute_terms(out, target_keys=torch.tensor([0, 1, 0, 3]))
        plain = loss_fn.compute_terms(out)
    expected_total = sum(fixed.weights[k] * terms[k] for k in STAGE1_TERMS)
    torch.testing.assert_close(total, expected_total)
    assert fixed.weights["ortho"] == 0 and fixed.get_config_dict()["logit_scale"] == pytest.approx(20.0)
    torch.testing.assert_close(terms["stu_rank"], F.cross_entropy(out.query_embeds @ out.target_embeds.T * 20.0,
                                                                  torch.arange(4)))
    assert masked["stu_rank"] < plain["stu_rank"] and masked["tea_rank"] < plain["tea_rank"]
    torch.testing.assert_close(masked["kl"], plain["kl"])


def _tiny_clip(tmp_path):
    torch.manual_seed(0)
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "projection_dim": 16, "bos_token_id": 97,
            "eos_token_id": 98, "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": 16}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    return clip


def test_from_clip_shared_token_learner_untied_for_stage2(tmp_path):
    clip = _tiny_clip(tmp_path)
    model = TGCIRModel.from_clip(str(tmp_path / "clip"), num_global_tokens=2, num_local_tokens=3).eval()
    assert model.config.tie_query_side and model.config.num_tokens == 5
    # the original's mask initialization: 0.1, and 1.0 on block p
    assert model.masks.weight[0, :8].eq(1).all() and model.masks.weight[0, 8:].sub(0.1).abs().max() < 1e-6
    assert model.stage1_logit_scale.item() == 10.0 and model.local_weight.eq(1).all()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 16), generator=g)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = clip.vision_model(pixel_values=pixels)
        torch.testing.assert_close(model.encode_image(pixels, output_details=True)[1]["image_embeds"],
                                   clip.visual_projection(out.pooler_output))
        with torch.no_grad():
            model.tokenlearn.tokenizers[0].conv[0].bias.add_(1.0)  # shared: the text side must follow
        shared = model.get_query_embeds(ids, pixel_values=pixels)
    model.freeze_target_side()  # freezing changes no module: the text side still follows the image side's
    assert model.config.tie_query_side
    model.untie_query_side()
    model.freeze_target_side()
    assert not model.config.tie_query_side
    assert torch.equal(model.tokenlearn_text.tokenizers[0].conv[0].bias, model.tokenlearn.tokenizers[0].conv[0].bias)
    with torch.no_grad():
        torch.testing.assert_close(model.get_query_embeds(ids, pixel_values=pixels), shared, rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.tokenlearn.parameters())
    assert all(p.requires_grad for p in model.tokenlearn_text.parameters())


def test_reference_token_shape_is_checked(converted, inputs):
    model = converted["stage2"][1]
    with pytest.raises(ValueError, match=r"expects \[B, 12, 32\]"):
        model.get_query_embeds(inputs["input_ids"], reference_features=torch.randn(4, 32))


def _write(tmp_path, state, name="bad.pt", epoch=0):
    path = tmp_path / name
    torch.save({"epoch": epoch, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def stage2_state():
    return torch.load(PARITY / CHECKPOINTS["stage2"], weights_only=True)["state_dict"]


def test_conversion_errors_name_the_key(tmp_path, stage2_state):
    state = dict(stage2_state)
    del state["backbone.text_fc.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"text_fc\.bias"):
        load_original_model(_write(tmp_path, state), num_heads=HEADS)
    state = dict(stage2_state) | {"backbone.mystery.weight": torch.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.mystery\.weight"):
        load_original_model(_write(tmp_path, state), num_heads=HEADS)
    state = dict(stage2_state) | {"s_remain_map.2.bias": torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match=r"s_remain_map\.2\.bias"):
        load_original_model(_write(tmp_path, state), num_heads=HEADS)
    key = "backbone.image_backbone.transformer.resblocks.1.ln_2.bias"
    state = dict(stage2_state) | {key: stage2_state[key] + 1}
    with pytest.raises(CheckpointMismatchError, match=re.escape(key)):
        load_original_model(_write(tmp_path, state), num_heads=HEADS)
    state = {k: v for k, v in stage2_state.items() if k != "backbone.masks_text.weight"}  # partial text copies
    with pytest.raises(CheckpointMismatchError, match=r"masks_text\.weight"):
        load_original_model(_write(tmp_path, state), num_heads=HEADS)
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": dict(stage2_state), "args": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_original_checkpoint(path)
    # the duplicate tower and CLIP's logit_scale are dropped, not needed: parity without them
    slim = {k: v for k, v in stage2_state.items()
            if not k.startswith("backbone.image_backbone.") and k != "backbone.clip.logit_scale"}
    a, _ = load_original_model(_write(tmp_path, slim, "slim.pt"), num_heads=HEADS)
    b, _ = load_original_model(PARITY / CHECKPOINTS["stage2"], num_heads=HEADS)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dispatcher_cli_processor_and_trust_remote_code(tmp_path, inputs, expected):
    assert detect_family(str(PARITY / CHECKPOINTS["stage1"])) == "tgcir"
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "spn4cir-tgcir"
    dispatcher_main(["--checkpoint", str(PARITY / CHECKPOINTS["stage2"]), "--output_dir", str(out),
                     "--tokenizer", str(tmp_path / "tok"), "--num_heads", "text=2", "--num_heads", "vision=1",
                     "--temperature", "0.01"])
    assert (out / "README.md").exists() and (out / "model.safetensors").exists()
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, TGCIRProcessor)
    assert type(processor.image_processor).__name__ == "CLIP4CIRImageProcessor"
    assert processor.image_processor.size == 64 and processor.image_processor.preprocessing == "resize"
    assert processor(text=["a red circle"])["input_ids"].shape == (1, 77)  # padded as clip.tokenize
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, TGCIRModel) and isinstance(model.config, TGCIRConfig)
    assert model.config.temperature == 0.01 and model.config.stage1_loss == "tgcir"
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    stdout = run_without_package(
        f"""
        import torch
        from transformers import AutoModel, AutoImageProcessor
        model = AutoModel.from_pretrained(r"{out}", trust_remote_code=True).eval()
        assert "modeling_spn4cir" not in type(model).__module__, type(model).__module__
        ip = AutoImageProcessor.from_pretrained(r"{out}", trust_remote_code=True)
        assert type(ip).__name__ == "CLIP4CIRImageProcessor" and ip.size == 64
        x = torch.load(r"{tmp_path / 'inputs.pt'}", weights_only=True)
        with torch.no_grad():
            target = model.get_target_embeds(x["target_pixel_values"])
            q = model(input_ids=x["input_ids"], pixel_values=x["reference_pixel_values"]).query_embeds
            s = model.similarity(q, target)
        torch.save({{"q": q, "s": s}}, r"{tmp_path / 'q.pt'}")
        print("OK", type(model).__name__)
        """,
        tmp_path,
    )
    assert "OK TGCIRModel" in stdout
    got = torch.load(tmp_path / "q.pt", weights_only=True)
    torch.testing.assert_close(got["q"], expected["query_features"], **TOL)
    torch.testing.assert_close(got["s"], expected["scores"], **TOL)
