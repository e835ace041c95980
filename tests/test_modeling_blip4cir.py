"""BLIP4CIR: parity of converted original SPN4CIR checkpoints with the original code's outputs, the model
contract (token-level reference features, learnable tau, stage-2 parameter set), the processor, `from_blip`,
trust_remote_code loading, and the "+Bi" stage-1 loss."""


import pytest
import torch
import torch.nn.functional as F
from conftest import parity_fixture, run_without_package
from transformers import AutoModel, AutoProcessor

import modeling_spn4cir  # noqa: F401  (registers the Auto classes)
from modeling_spn4cir import BLIP4CIRConfig, BLIP4CIRModel, BLIP4CIRProcessor, CLIP4CIRImageProcessor
from modeling_spn4cir.blip4cir.convert_blip4cir_original_checkpoint import (
    CheckpointMismatchError, convert_original_checkpoint, infer_config, load_original_model, read_original_checkpoint)
from modeling_spn4cir.conversion_utils import load_checkpoint
from modeling_spn4cir.blip4cir.losses_blip4cir import BLIP4CIRBidirectionalLoss
from trainers.text import fashioniq_eval_caption

PARITY, META, TOL = parity_fixture("parity_blip4cir")
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-3}
GEOMETRY = META["geometry"]
HEADS = [f"text={GEOMETRY['text_heads']}", f"vision={GEOMETRY['vision_heads']}"]
CHECKPOINTS = {"stage2": "spn4cir_blip4cir_stage2.pt", "stage1": "spn4cir_blip4cir_stage1.pt"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both checkpoint formats converted once (with the tiny vocabulary as tokenizer)."""
    root = tmp_path_factory.mktemp("converted")
    return {
        name: convert_original_checkpoint(PARITY / file, root / name, tokenizer=str(PARITY / "vocab.txt"),
                                          num_heads=HEADS)
        for name, file in CHECKPOINTS.items()
    }


def _all_outputs(model, inputs):
    """Every tensor of expected.safetensors, computed through the model's public API (as the original code
    paths named in the fixture README)."""
    ref, tgt, extra = inputs["reference_pixel_values"], inputs["target_pixel_values"], inputs["bank_extra_pixel_values"]
    # The model writes [ENC] itself: feed the tokenizer's ids with [CLS] and check they become the fixture's.
    ids, mask = inputs["input_ids_before_enc_substitution"], inputs["attention_mask"]
    got = {}
    with torch.no_grad():
        vit = model.vision_model(pixel_values=ref, output_hidden_states=True)
        got["reference_vit_embeddings"] = vit.hidden_states[0]
        for i, hidden in enumerate(vit.hidden_states[1:]):
            got[f"reference_vit_block{i}_output"] = hidden
        reference_tokens = model.get_reference_features(ref)
        target_embeds, target_tokens = model.get_target_embeds_and_reference_features(tgt)
        got["reference_vit_last_hidden_state"] = reference_tokens
        got["target_vit_last_hidden_state"] = target_tokens
        got["target_vision_proj_raw"] = model.vision_proj(target_tokens[:, 0])
        got["target_features"] = target_embeds
        got["reference_features"] = model.get_target_embeds(ref)
        got["bank_extra_features"] = model.get_target_embeds(extra)
        gallery = torch.cat([got["target_features"], got["reference_features"]])
        got["gallery_features"] = gallery
        got["text_embeddings_output"] = model.text_encoder.embeddings(input_ids=inputs["input_ids"])
        hidden = model.encode_text(ids, mask, reference_tokens).last_hidden_state
        got["text_last_hidden_state"] = hidden
        got["text_last_hidden_state_cls"] = hidden[:, 0]
        got["text_proj_raw"] = model.text_proj(hidden[:, 0])
        query = model.get_query_embeds(ids, mask, pixel_values=ref)
        got["query_features"] = query
        got["scores"] = model.similarity(query, gallery)
        got["distances"] = 1 - got["scores"]
        got["ranking_fiq"] = torch.argsort(got["distances"], dim=-1)
        # CIRR: the query's own reference (gallery row B + i) removed from its ranking.
        batch = query.shape[0]
        got["ranking_cirr_reference_removed"] = torch.stack([
            row[row != batch + i] for i, row in enumerate(torch.argsort(1 - model.similarity(
                F.normalize(query, dim=-1), gallery), dim=-1))
        ])
        got["query_target_scores"] = model.similarity(query, target_embeds)
        bank = torch.cat([target_embeds, got["bank_extra_features"]])
        got["stage2_target_bank"] = bank
        bank_references = reference_tokens[inputs["stage2_refer_indexs"]]
    # Stage 2: the query side against the frozen bank, reference tokens from the reference bank.
    model.zero_grad()
    model.freeze_target_side()
    out = model(input_ids=ids, attention_mask=mask, reference_features=bank_references, target_embeds=bank)
    loss = F.cross_entropy(out.logits, inputs["stage2_labels"])
    loss.backward()
    got["stage2_logits_tau0.03"] = out.logits.detach()
    got["stage2_loss_tau0.03"] = loss.detach()
    got["stage2_grad_text_proj_weight"] = model.text_proj.weight.grad
    got["stage2_grad_text_proj_bias"] = model.text_proj.bias.grad
    got["stage2_grad_tau"] = model.tau.grad
    with torch.no_grad():
        logits = model.similarity(out.query_embeds, bank) / 0.02
        got["stage2_loss_tau0.02"] = F.cross_entropy(logits, inputs["stage2_labels"])
    return got, out


def _assert_parity(got, expected):
    assert set(got) == set(expected), set(expected) ^ set(got)
    for key, value in expected.items():
        if value.dtype == torch.int64:
            assert torch.equal(got[key], value), key
        else:
            tol = GRAD_TOL if key.startswith("stage2_grad") else TOL
            torch.testing.assert_close(got[key].float(), value, **tol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("fmt", list(CHECKPOINTS))
def test_parity_through_converted_directory(fmt, converted, inputs, expected):
    out_dir = converted[fmt]
    assert (out_dir / "model.safetensors").exists() and (out_dir / "README.md").exists()
    model = AutoModel.from_pretrained(out_dir).eval()
    assert isinstance(model, BLIP4CIRModel)
    assert model.config.vision_config.layer_norm_eps == 1e-6
    assert model.config.text_config.num_attention_heads == GEOMETRY["text_heads"]
    assert model.config.vision_config.num_attention_heads == GEOMETRY["vision_heads"]
    assert model.config.enc_token_id == META["special_token_ids"]["enc"]
    assert model.get_temperature().item() == pytest.approx(META["temperature"]["stage2_tau_used_for_loss"])
    got, out = _all_outputs(model, inputs)
    _assert_parity(got, expected)
    # the learnable temperature travels with the forward output (for losses under DDP)
    assert out.temperature is model.tau
    assert got["stage2_loss_tau0.03"].item() == pytest.approx(META["stage2_loss_tau0.03"], abs=1e-4)
    assert got["stage2_loss_tau0.02"].item() == pytest.approx(META["stage2_loss_tau0.02"], abs=1e-4)


def test_processor_reproduces_the_fed_input_ids(converted, inputs):
    processor = AutoProcessor.from_pretrained(converted["stage2"])
    assert isinstance(processor, BLIP4CIRProcessor)
    assert isinstance(processor.image_processor, CLIP4CIRImageProcessor)
    assert processor.image_processor.size == GEOMETRY["image_size"]
    assert processor.image_processor.preprocessing == "targetpad"
    assert processor.image_processor.target_ratio == 1.25
    ids = META["special_token_ids"]
    assert processor.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [ids["dec_bos"], ids["enc"]]
    for captions in (META["captions"], [fashioniq_eval_caption(p) for p in META["captions_raw_pairs"]]):
        batch = processor(text=captions)
        assert torch.equal(batch["input_ids"], inputs["input_ids"])
        assert torch.equal(batch["attention_mask"], inputs["attention_mask"])
    plain = processor.tokenizer(META["captions"], padding="longest", return_tensors="pt")["input_ids"]
    assert torch.equal(plain, inputs["input_ids_before_enc_substitution"])


def test_query_side_parameters_are_the_original_stage2_set():
    model, _ = load_original_model(PARITY / CHECKPOINTS["stage2"], num_heads=HEADS)
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.query_side_parameters())}
    original = {k.removeprefix("blip.") for k in META["stage2_params_with_grad"]}
    assert names == original
    model.freeze_target_side()
    model.train()
    assert not model.vision_model.training and not model.vision_proj.training
    # SPN4CIR's stage 2 runs `model.blip.eval()`: no dropout on the trained text encoder either
    assert model.training and not any(m.training for m in model.modules() if m is not model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == original
    model.config.stage2_dropout = True
    model.train()
    assert model.text_encoder.training and not model.vision_model.training


def test_token_reference_features_any_dtype(inputs, expected):
    """Stage 2 reads [N, T, H] ViT tokens from a (possibly fp16) bank; the wrong shape is a clear error."""
    model, _ = load_original_model(PARITY / CHECKPOINTS["stage2"], num_heads=HEADS)
    tokens = expected["reference_vit_last_hidden_state"]
    assert tokens.shape == (GEOMETRY["batch"], GEOMETRY["num_vit_tokens"], GEOMETRY["vision_width"])
    with torch.no_grad():
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"], reference_features=tokens.half())
    torch.testing.assert_close(query, expected["query_features"], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match=r"ViT tokens"):
        model.get_query_embeds(inputs["input_ids"], reference_features=expected["reference_features"])


def test_attention_heads_default_rule_and_option(tmp_path):
    state = read_original_checkpoint(PARITY / CHECKPOINTS["stage1"]).blip_state_dict
    default = infer_config(state)
    assert default.text_config.num_attention_heads == GEOMETRY["text_hidden"] // 64
    assert default.vision_config.num_attention_heads == GEOMETRY["vision_width"] // 64
    assert default.vision_config.image_size == GEOMETRY["image_size"]
    assert default.text_config.encoder_hidden_size == GEOMETRY["encoder_width (cross-attn key/value input dim)"]
    assert default.embed_dim == GEOMETRY["embed_dim"]
    with pytest.raises(ValueError, match="TOWER=N"):
        infer_config(state, num_heads=["text:2"])
    with pytest.raises(ValueError, match="unknown tower"):
        infer_config(state, num_heads=["audio=2"])
    with pytest.raises(ValueError, match="not divisible"):
        infer_config(state, num_heads=["vision=3"])
    # the CLI through the package dispatcher: family detected from the keys, --num_heads repeatable
    from modeling_spn4cir.convert_original_checkpoint import detect_family
    from modeling_spn4cir.convert_original_checkpoint import main as dispatch

    assert detect_family(PARITY / CHECKPOINTS["stage2"]) == detect_family(PARITY / CHECKPOINTS["stage1"]) == "blip4cir"
    dispatch(["--checkpoint", str(PARITY / CHECKPOINTS["stage1"]), "--output_dir", str(tmp_path / "cli"),
              "--num_heads", "text=4", "--num_heads", "vision=2", "--temperature", "0.02"])
    config = BLIP4CIRConfig.from_pretrained(tmp_path / "cli")
    assert (config.text_config.num_attention_heads, config.vision_config.num_attention_heads) == (4, 2)
    assert config.temperature == 0.02
    assert not (tmp_path / "cli" / "tokenizer_config.json").exists()


def _write(path, data):
    torch.save(data, path)
    return path


def test_bad_checkpoints_name_the_key(tmp_path):
    good = load_checkpoint(PARITY / CHECKPOINTS["stage2"])
    state = dict(good["state_dict"])
    extra = _write(tmp_path / "extra.pt", {"epoch": 0, "state_dict": state | {"blip.itm_head.weight": torch.zeros(2)}})
    with pytest.raises(CheckpointMismatchError, match=r"itm_head\.weight"):
        load_original_model(extra, num_heads=HEADS)
    foreign = _write(tmp_path / "foreign.pt", {"epoch": 0, "state_dict": state | {"combiner.w": torch.zeros(2)}})
    with pytest.raises(CheckpointMismatchError, match=r"combiner\.w"):
        load_original_model(foreign, num_heads=HEADS)
    missing_key = "blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"
    missing = _write(tmp_path / "missing.pt", {"epoch": 0, "state_dict": {k: v for k, v in state.items()
                                                                         if k != missing_key}})
    with pytest.raises(CheckpointMismatchError, match=r"layer\.1\.crossattention\.self\.value\.bias"):
        load_original_model(missing, num_heads=HEADS)
    shape_key = "blip.text_proj.bias"
    bad_shape = _write(tmp_path / "shape.pt", {"epoch": 0, "state_dict": state | {shape_key: torch.zeros(3)}})
    with pytest.raises(CheckpointMismatchError, match=r"text_proj\.bias"):
        load_original_model(bad_shape, num_heads=HEADS)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_original_model(_write(tmp_path / "other.pt", {"model": {}}))
    # a tokenizer whose vocabulary does not fit the checkpoint
    (tmp_path / "small_vocab.txt").write_text("\n".join((PARITY / "vocab.txt").read_text().splitlines()[:500]))
    with pytest.raises(ValueError, match="another tokenizer"):
        convert_original_checkpoint(PARITY / CHECKPOINTS["stage2"], tmp_path / "out",
                                    tokenizer=str(tmp_path / "small_vocab.txt"), num_heads=HEADS)
    assert not (tmp_path / "out").exists()


def test_stage1_and_stage2_formats_carry_tau():
    stage2 = read_original_checkpoint(PARITY / CHECKPOINTS["stage2"])
    stage1 = read_original_checkpoint(PARITY / CHECKPOINTS["stage1"])
    assert stage2.source_format == "spn4cir_stage2" and stage1.source_format == "blip4cir_stage1"
    assert stage1.tau is None and float(stage2.tau) == pytest.approx(0.03)
    model, _ = load_original_model(PARITY / CHECKPOINTS["stage1"], num_heads=HEADS, temperature=0.02)
    assert model.tau.item() == pytest.approx(0.02) and model.config.temperature == 0.02


def test_trust_remote_code_without_the_package(converted, tmp_path, inputs, expected):
    out_dir = converted["stage2"]
    stdout = run_without_package(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained(r"{out_dir}", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(r"{out_dir}", trust_remote_code=True)
        assert "modeling_spn4cir" not in type(model).__module__, type(model).__module__
        assert "modeling_spn4cir" not in type(processor.image_processor).__module__
        meta = json.load(open(r"{PARITY / 'meta.json'}"))
        inputs = load_file(r"{PARITY / 'inputs.safetensors'}")
        expected = load_file(r"{PARITY / 'expected.safetensors'}")
        batch = processor(text=meta["captions"])
        assert torch.equal(batch["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=inputs["reference_pixel_values"],
                        target_pixel_values=inputs["target_pixel_values"])
        torch.testing.assert_close(out.query_embeds, expected["query_features"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.target_embeds, expected["target_features"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.logits * 0.03, expected["query_target_scores"], atol=1e-4, rtol=1e-4)
        print("OK", type(model).__name__, type(processor).__name__)
        """,
        tmp_path,
    )
    assert "OK BLIP4CIRModel BLIP4CIRProcessor" in stdout


def _tiny_blip_retrieval():
    from transformers import BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(0)
    config = BlipConfig(
        text_config={"vocab_size": 120, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": 40, "bos_token_id": 118},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6},
        image_text_hidden_size=24,
    )
    return BlipForImageTextRetrieval(config).eval()


def test_from_blip_copies_a_blip_retrieval_checkpoint(tmp_path):
    blip = _tiny_blip_retrieval()
    blip.save_pretrained(tmp_path / "blip")
    model = BLIP4CIRModel.from_blip(str(tmp_path / "blip"), temperature=0.02).eval()
    assert model.config.embed_dim == 24 and model.config.enc_token_id == 119
    assert model.get_temperature().item() == pytest.approx(0.02)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(5, 110, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        image = blip.vision_model(pixel_values=pixels).last_hidden_state
        expected_target = F.normalize(blip.vision_proj(image[:, 0]), dim=-1)
        enc_ids = ids.clone()
        enc_ids[:, 0] = 119
        text = blip.text_encoder(input_ids=enc_ids, attention_mask=mask, encoder_hidden_states=image,
                                 is_decoder=False).last_hidden_state
        expected_query = F.normalize(blip.text_proj(text[:, 0]), dim=-1)
        torch.testing.assert_close(model.get_target_embeds(pixels), expected_target)
        torch.testing.assert_close(model.get_query_embeds(ids, mask, pixel_values=pixels), expected_query)
    # saved and reloaded through the Auto classes
    model.save_pretrained(tmp_path / "cir")
    again = AutoModel.from_pretrained(tmp_path / "cir").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.get_query_embeds(ids, mask, pixel_values=pixels), expected_query)
    assert again.tau.item() == pytest.approx(0.02)


def test_bidirectional_loss_trains_the_reversal_token():
    torch.manual_seed(0)
    blip = _tiny_blip_retrieval()
    text, vision = blip.config.text_config.to_dict(), blip.config.vision_config.to_dict()
    plain = BLIP4CIRModel(BLIP4CIRConfig(text_config=text, vision_config=vision, embed_dim=16))
    assert plain.reversal_token is None and plain.config.stage1_loss == "in_batch_infonce"
    model = BLIP4CIRModel(BLIP4CIRConfig(text_config=text, vision_config=vision, embed_dim=16, bidirectional=True))
    assert model.config.stage1_loss == "blip4cir_bidirectional"
    assert all(p is not model.reversal_token for p in model.query_side_parameters())  # stage 1 only
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 110, (4, 6), generator=g),
             "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "pixel_values": torch.randn(4, 3, 32, 32, generator=g),
             "target_pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    loss_fn = BLIP4CIRBidirectionalLoss()
    assert loss_fn.model_kwargs == {"return_reverse_terms": True}
    out = model(**batch, **loss_fn.model_kwargs)
    tau = model.tau
    labels = torch.arange(4)
    reverse_query = out.reverse_query_embeds
    assert reverse_query.shape == (4, 16)
    assert not torch.allclose(reverse_query, model.get_query_embeds(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["target_pixel_values"]))
    forward_term = F.cross_entropy(out.query_embeds @ out.target_embeds.T / tau, labels)
    reverse_term = F.cross_entropy(reverse_query @ out.reference_embeds.T / tau, labels)
    loss = loss_fn(out)
    torch.testing.assert_close(loss, forward_term + 0.4 * reverse_term)
    from_config = BLIP4CIRBidirectionalLoss.from_config(model.config, temperature=0.5)  # the trainer's entry
    assert from_config.bidirectional is True
    torch.testing.assert_close(from_config(out), loss)  # tau comes from the output, not the fixed 0.5
    assert BLIP4CIRBidirectionalLoss.from_config(plain.config).model_kwargs == {}
    torch.testing.assert_close(out.reference_embeds, model.get_target_embeds(batch["pixel_values"]))
    loss.backward()
    assert model.reversal_token.grad is not None and model.reversal_token.grad.abs().sum() > 0
    assert model.tau.grad is not None and model.tau.grad != 0
    # off: the same loss without the reverse term; a plain model returns no reverse terms
    off = BLIP4CIRBidirectionalLoss(bidirectional=False)
    assert off.model_kwargs == {}
    torch.testing.assert_close(off(out), forward_term)
    plain_out = plain(**batch, return_reverse_terms=True)
    assert plain_out.reverse_query_embeds is None
    with pytest.raises(ValueError, match="reversed queries"):
        BLIP4CIRBidirectionalLoss(bidirectional=True)(plain_out)
