"""SPRC family: parity of converted original SPN4CIR / SPRC checkpoints with the original code's outputs, the model
contract (token-set targets, max-over-tokens scoring, stage-2 query-side copy), SPRC's stage-1 objective,
BLIP-2 initialization, precision, and Hub readiness."""


import pytest
import torch
import torch.nn.functional as F
from conftest import parity_fixture, run_without_package
from transformers import AutoModel, AutoProcessor, Blip2Config, Blip2ForImageTextRetrieval

import modeling_spn4cir  # noqa: F401  (registers the Auto classes)
from modeling_spn4cir import SPRCModel, SPRCProcessor
from modeling_spn4cir.convert_original_checkpoint import detect_family
from modeling_spn4cir.convert_original_checkpoint import main as dispatcher_main
from modeling_spn4cir.sprc.convert_sprc_original_checkpoint import (
    CheckpointMismatchError, convert_original_checkpoint, load_original_model, parse_num_heads)
from modeling_spn4cir.sprc.losses_sprc import SPRCStage1Loss

PARITY, META, TOL = parity_fixture("parity_sprc")
# The fixtures' head counts (the weights do not fix them; the released models' default rule would give 1 and 1).
HEADS = [f"vision={META['vision']['num_attention_heads']}", f"qformer={META['qformer']['num_attention_heads']}"]
STAGE1_ONLY = ("query_text_last_hidden_state_stage1", "query_features_stage1", "scores_stage1")
COPY_DEPENDENT = ("query_text_last_hidden_state", "query_features", "scores", "ranking", "stage2_logits", "stage2_loss")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both original formats converted (with the fixture's vocab.txt as tokenizer)."""
    root = tmp_path_factory.mktemp("sprc")
    return {fmt: convert_original_checkpoint(PARITY / f"sprc_{fmt}.pt", root / fmt, tokenizer=str(PARITY / "vocab.txt"),
                                             num_heads=HEADS) for fmt in ("stage1", "stage2")}


def _outputs(model, inputs, expected):
    """Every tensor of expected.safetensors, computed with the model's public methods."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    references, targets = inputs["reference_pixel_values"], inputs["target_pixel_values"]
    gallery = torch.cat([targets, references])
    out = {}
    with torch.no_grad():
        out["gallery_vit_last_hidden_state"] = model.get_vision_hidden_states(gallery)
        image_embeds = model.get_image_embeds(gallery)
        out["gallery_image_embeds"] = image_embeds
        out["gallery_qformer_query_output"] = model.get_image_query_output(image_embeds)
        gallery_features, reference_features = model.get_target_embeds_and_reference_features(gallery)
        out["gallery_features"] = gallery_features
        # As validate.py: the reference side of query i is gallery row 4 + i.
        reference_features = reference_features[len(targets):]
        fusion = model.get_fusion_output(ids, mask, reference_features)
        out["fusion_last_hidden_state"] = fusion
        out["fusion_query_hidden"] = model.get_fusion_states(ids, mask, reference_features)
        h = out["fusion_query_hidden"]
        out["query_text_last_hidden_state"] = model.get_query_text_output(ids, mask, h)
        result = model(input_ids=ids, attention_mask=mask, reference_features=reference_features,
                       target_embeds=gallery_features)
        out["query_features"] = result.query_embeds
        out["scores"] = model.similarity(result.query_embeds, gallery_features)
        torch.testing.assert_close(result.logits, out["scores"] / model.config.temperature)
        out["query_text_last_hidden_state_stage1"] = model.get_query_text_output(ids, mask, h, use_query_qformer=False)
        query_stage1 = model.query_embeds_from_fusion_states(ids, mask, h, use_query_qformer=False)
        out["query_features_stage1"] = query_stage1
        out["scores_stage1"] = model.similarity(query_stage1, gallery_features)
        # The original stage-2 banks: reference fusion states (reference image + caption), target token sets.
        out["stage2_refer_bank_hidden"] = model.get_fusion_states(ids, mask, pixel_values=references)
        out["stage2_target_fusion_hidden"] = model.get_fusion_states(ids, mask, pixel_values=targets)
        out["stage2_target_bank"] = model.get_target_embeds(gallery)
        query = model.get_query_embeds(ids, mask, fusion_states=expected["stage2_refer_bank_hidden"])
        logits = model.similarity(query, expected["stage2_target_bank"]) / model.get_temperature()
        out["stage2_logits"] = logits
        out["stage2_loss"] = F.cross_entropy(logits, inputs["target_index"])
        out["ranking"] = torch.argsort(1 - out["scores"], dim=-1)
    return out


def _assert_parity(got, expected, keys):
    for key in keys:
        if key == "ranking":
            assert torch.equal(got[key], expected[key])
            continue
        assert got[key].shape == expected[key].shape, key
        assert torch.allclose(got[key], expected[key], **TOL), (key, (got[key] - expected[key]).abs().max().item())


def test_stage2_checkpoint_parity_through_converted_directory(converted, inputs, expected):
    model = AutoModel.from_pretrained(converted["stage2"]).eval()
    assert isinstance(model, SPRCModel) and not model.config.tie_query_side
    assert model.config.temperature == pytest.approx(META["temperature"]["stage2_tau"])
    got = _outputs(model, inputs, expected)
    _assert_parity(got, expected, list(expected))
    # The stage-2 copy was trained: using the shared Q-Former instead changes the scores.
    assert not torch.allclose(got["scores"], got["scores_stage1"], atol=1e-3)


def test_stage1_checkpoint_parity_through_converted_directory(converted, inputs, expected):
    model = AutoModel.from_pretrained(converted["stage1"]).eval()
    assert model.qformer_query is None and model.config.tie_query_side
    assert model.temp.item() == pytest.approx(META["temperature"]["stage1_temp_in_ckpt"])
    got = _outputs(model, inputs, expected)
    shared = [k for k in expected if k not in COPY_DEPENDENT]
    _assert_parity(got, expected, shared)
    # A stage-1 model's query side is the shared Q-Former: its queries are the original's query_type 0.
    for key, stage1_key in zip(("query_text_last_hidden_state", "query_features", "scores"), STAGE1_ONLY):
        assert torch.allclose(got[key], expected[stage1_key], **TOL), key
    # Freezing changes no module (it names the step that does); the stage-2 preparation copies the caption side
    # (init_stage2): same numbers until it is trained.
    with pytest.raises(RuntimeError, match=r"call `model.untie_query_side\(\)` first"):
        model.freeze_target_side()
    assert model.qformer_query is None and model.config.tie_query_side
    model.untie_query_side()
    assert not model.config.tie_query_side and model.qformer_query is not None
    with torch.no_grad():
        again = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"],
                                       pixel_values=inputs["reference_pixel_values"])
    assert torch.allclose(again, expected["query_features_stage1"], **TOL)


def test_similarity_is_max_over_target_tokens(converted, expected):
    model = AutoModel.from_pretrained(converted["stage2"])
    query, bank = expected["query_features"], expected["gallery_features"]
    by_hand = torch.stack([torch.stack([(bank[n] @ query[b]).max() for n in range(len(bank))])
                           for b in range(len(query))])
    torch.testing.assert_close(model.similarity(query, bank), by_hand)
    torch.testing.assert_close(model.similarity(query, bank), expected["scores"], **TOL)


def test_stage2_trains_exactly_the_query_side_copy(converted, inputs, expected):
    """The original's stage-2 loss and its gradient-receiving set: Qformer_query + text_proj_q only (and, inside
    the copy, neither cross-attention nor query feed-forward, which pass 2 never runs)."""
    model = AutoModel.from_pretrained(converted["stage2"])
    model.freeze_target_side()
    model.eval()  # the fixture is eval-mode (no dropout)
    names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in model.query_side_parameters()}}
    assert names == {n for n, _ in model.named_parameters() if n.startswith("qformer_query.")}
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # (a) the original's numbers, from its reference bank (fusion states)
    query = model.get_query_embeds(ids, mask, fusion_states=expected["stage2_refer_bank_hidden"])
    loss = F.cross_entropy(model.similarity(query, expected["stage2_target_bank"]) / model.get_temperature(),
                           inputs["target_index"])
    assert torch.allclose(loss, expected["stage2_loss"], **TOL)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    unused = ("crossattention", "intermediate_query", "output_query")
    assert with_grad == {n for n in names if not any(u in n for u in unused)}
    assert "qformer_query.text_projection.weight" in with_grad and "qformer_query.embeddings.word_embeddings.weight" in with_grad
    # (b) the generic path: the per-image reference bank holds ViT tokens; pass 1 runs frozen
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        reference = model.get_reference_features(inputs["reference_pixel_values"])
    out = model(input_ids=ids, attention_mask=mask, reference_features=reference,
                target_embeds=expected["stage2_target_bank"])
    F.cross_entropy(out.logits, inputs["target_index"]).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == with_grad
    torch.testing.assert_close(out.query_embeds, expected["query_features"], **TOL)


def test_fp16_reference_bank_is_close(converted, inputs, expected):
    model = AutoModel.from_pretrained(converted["stage2"]).eval()
    with torch.no_grad():
        reference = model.get_reference_features(inputs["reference_pixel_values"]).half()
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"], reference_features=reference)
    assert query.dtype == torch.float32
    assert torch.allclose(query, expected["query_features"], atol=5e-3)


def test_bf16_vision_tower(converted, inputs, expected):
    """dtype=bfloat16 runs the ViT in bf16 and keeps ln_vision, Q-Former and projections in fp32 (as the original's
    fp16 ViT). Stated tolerance for bf16 on CPU: 2e-2 on scores (fp32 parity: 1e-4)."""
    model = AutoModel.from_pretrained(converted["stage2"], dtype=torch.bfloat16).eval()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["vision_model.encoder.layers.0.self_attn.qkv.weight"] == torch.bfloat16
    assert dtypes["vision_model.embeddings.patch_embedding.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items()
               if not n.startswith("vision_model.") or n.startswith("vision_model.post_layernorm."))
    gallery = torch.cat([inputs["target_pixel_values"], inputs["reference_pixel_values"]])
    with torch.no_grad():
        target, reference = model.get_target_embeds_and_reference_features(gallery)
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"], reference_features=reference[4:])
    assert target.dtype == reference.dtype == query.dtype == torch.float32
    assert torch.allclose(model.similarity(query, target), expected["scores"], atol=2e-2)


def test_processor_reproduces_the_original_tokens(converted, inputs):
    processor = AutoProcessor.from_pretrained(converted["stage2"])
    assert isinstance(processor, SPRCProcessor)
    assert processor.preprocess_text(META["captions_raw"]) == META["captions_processed"]
    encoded = processor(text=META["captions_raw"])
    assert torch.equal(encoded["input_ids"], inputs["input_ids"])
    assert torch.equal(encoded["attention_mask"], inputs["attention_mask"])
    assert processor.tokenizer.convert_tokens_to_ids("[DEC]") == META["tokenizer"]["special_token_ids"]["[DEC]"]
    from PIL import Image

    pixels = processor(images=[Image.new("RGB", (80, 50), (200, 10, 10))])["pixel_values"]
    assert pixels.shape == (1, 3, META["vision"]["image_size"], META["vision"]["image_size"])


def test_trust_remote_code_without_the_package(converted, inputs, expected, tmp_path):
    stdout = run_without_package(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained(r"{converted['stage2']}", trust_remote_code=True).eval()
        assert "modeling_spn4cir" not in type(model).__module__, type(model).__module__
        processor = AutoProcessor.from_pretrained(r"{converted['stage2']}", trust_remote_code=True)
        inputs = load_file(r"{PARITY / 'inputs.safetensors'}")
        expected = load_file(r"{PARITY / 'expected.safetensors'}")
        import json
        captions = json.load(open(r"{PARITY / 'meta.json'}"))["captions_raw"]
        text = processor(text=captions)
        assert torch.equal(text["input_ids"], inputs["input_ids"])
        gallery = torch.cat([inputs["target_pixel_values"], inputs["reference_pixel_values"]])
        with torch.no_grad():
            out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                        pixel_values=inputs["reference_pixel_values"], target_pixel_values=gallery)
        scores = out.logits * model.config.temperature
        assert torch.allclose(scores, expected["scores"], atol=1e-4, rtol=1e-4), (scores - expected["scores"]).abs().max()
        print("OK", type(model).__name__, type(processor).__name__)
        """,
        tmp_path,
    )
    assert "OK SPRCModel SPRCProcessor" in stdout


def test_dispatcher_detects_both_formats(tmp_path, inputs, expected):
    for fmt in ("stage1", "stage2"):
        assert detect_family(str(PARITY / f"sprc_{fmt}.pt")) == "sprc"
    out = tmp_path / "cli"
    dispatcher_main(["--checkpoint", str(PARITY / "sprc_stage2.pt"), "--output_dir", str(out),
                     "--num_heads", HEADS[0], "--num_heads", HEADS[1]])
    model = AutoModel.from_pretrained(out).eval()
    assert model.config.vision_config.num_attention_heads == META["vision"]["num_attention_heads"]
    with torch.no_grad():
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"],
                                       pixel_values=inputs["reference_pixel_values"])
    assert torch.allclose(query, expected["query_features"], **TOL)


def test_default_heads_follow_the_released_rule_and_change_the_numbers(inputs, expected):
    model, _ = load_original_model(PARITY / "sprc_stage2.pt")  # width 64 -> 1 head in both towers
    assert model.config.vision_config.num_attention_heads == 1 and model.config.qformer_config.num_attention_heads == 1
    with torch.no_grad():
        query = model.get_query_embeds(inputs["input_ids"], inputs["attention_mask"],
                                       pixel_values=inputs["reference_pixel_values"])
    assert not torch.allclose(query, expected["query_features"], atol=1e-3)
    with pytest.raises(ValueError, match="TOWER=N"):
        parse_num_heads(["text=3"])
    with pytest.raises(ValueError, match="multiple of 3 heads"):
        load_original_model(PARITY / "sprc_stage2.pt", ["vision=3"])


def _rewrite(tmp_path, edit):
    data = torch.load(PARITY / "sprc_stage2.pt", weights_only=True)
    edit(data["state_dict"])
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    return path


def test_bad_checkpoints_name_the_key(tmp_path):
    path = _rewrite(tmp_path, lambda s: s.__setitem__("blip_model.Qformer.bert.encoder.layer.0.mystery.weight",
                                                      torch.zeros(2)))
    with pytest.raises(CheckpointMismatchError, match="layer.0.mystery.weight"):
        load_original_model(path, HEADS)
    path = _rewrite(tmp_path, lambda s: s.pop("blip_model.Qformer_query.bert.encoder.layer.1.output.dense.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"qformer_query\.qformer\.encoder\.layer\.1\.output\.dense\.bias"):
        load_original_model(path, HEADS)
    path = _rewrite(tmp_path, lambda s: s.__setitem__("blip_model.text_proj_q.weight", torch.zeros(7, 64)))
    with pytest.raises(CheckpointMismatchError, match=r"qformer_query\.text_projection\.weight"):
        load_original_model(path, HEADS)
    path = _rewrite(tmp_path, lambda s: s.__setitem__("other.weight", torch.zeros(1)))
    with pytest.raises(CheckpointMismatchError, match="other.weight"):
        load_original_model(path, HEADS)
    card = (convert_original_checkpoint(PARITY / "sprc_stage2.pt", tmp_path / "card", num_heads=HEADS)
            / "README.md").read_text()
    assert "Qformer.cls.predictions" in card and "position_ids" in card  # dropped keys are named
    with pytest.raises(ValueError, match="tokens"):
        convert_original_checkpoint(PARITY / "sprc_stage2.pt", tmp_path / "tok", num_heads=HEADS,
                                    tokenizer=str(_small_vocab(tmp_path)))


def _small_vocab(tmp_path):
    path = tmp_path / "vocab_small.txt"
    path.write_text("\n".join((PARITY / "vocab.txt").read_text().splitlines()[:500]) + "\n")
    return path


def _stage1_batch(inputs):
    return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=inputs["reference_pixel_values"], target_pixel_values=inputs["target_pixel_values"])


def test_stage1_objective_terms_and_gradients(converted, inputs):
    model = AutoModel.from_pretrained(converted["stage1"]).eval()
    loss_fn = SPRCStage1Loss()
    out = model(**_stage1_batch(inputs), **loss_fn.model_kwargs)
    assert out.target_embeds.shape == (4, META["num_query_token"], META["embed_dim"])
    terms = loss_fn.terms(out)
    temp = model.temp
    # L_itc: in-batch CE of max-over-target-token scores / the learnable temp
    itc = F.cross_entropy(model.similarity(out.query_embeds, out.target_embeds) / temp, torch.arange(4))
    torch.testing.assert_close(terms["loss_itc"], itc)
    torch.testing.assert_close(loss_fn(out), terms["loss_itc"] + 0.4 * terms["loss_rtc"] + 0.4 * terms["loss_align"])
    fiq = SPRCStage1Loss(rtc_weight=1.0, align_weight=1.0)
    torch.testing.assert_close(fiq(out), sum(terms.values()))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    itc_grads, rtc_grads, align_grads = (grads(terms[k]) for k in ("loss_itc", "loss_rtc", "loss_align"))
    assert "temp" in itc_grads and "temp" in rtc_grads
    assert "prompt_tokens" in rtc_grads and "prompt_tokens" not in itc_grads
    assert "prompt_tokens" not in align_grads and "query_tokens" in align_grads  # stop-gradient on the prompts
    assert "vision_model.post_layernorm.weight" in itc_grads  # ln_vision trains, the ViT is frozen
    for touched in (itc_grads, rtc_grads, align_grads):
        assert not any(n.startswith("vision_model.") and "post_layernorm" not in n for n in touched)
    # duplicates: the same target twice is not a negative of the other query
    keys = torch.tensor([7, 7, 1, 2])
    masked = loss_fn.terms(out, keys)["loss_itc"]
    logits = model.similarity(out.query_embeds, out.target_embeds) / temp
    logits[0, 1] = logits[1, 0] = float("-inf")
    torch.testing.assert_close(masked, F.cross_entropy(logits, torch.arange(4)))


def test_prompt_text_query_ignores_padding(converted, inputs):
    """The text-only pass puts the prompts after [CLS]; its mask must still line up with the tokens: more padding
    must not change the result (a misaligned mask would attend to a pad or hide a word)."""
    model = AutoModel.from_pretrained(converted["stage1"]).eval()
    ids, mask = inputs["input_ids"][:3, :16], inputs["attention_mask"][:3, :16]
    assert mask[:, -1].sum() == 0  # these captions end in padding
    padded_ids = torch.cat([ids, torch.zeros(3, 8, dtype=ids.dtype)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 8, dtype=mask.dtype)], 1)
    with torch.no_grad():
        a = model.get_prompt_text_embeds(ids, mask)
        b = model.get_prompt_text_embeds(padded_ids, padded_mask)
        c = model.get_prompt_text_embeds(ids, torch.ones_like(mask))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def _tiny_blip2():
    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=40, max_position_embeddings=48, encoder_hidden_size=32,
                            use_qformer_text_input=True),
        num_query_tokens=8, image_text_hidden_size=16,
    )


def test_from_blip2(tmp_path):
    torch.manual_seed(0)
    blip = Blip2ForImageTextRetrieval(_tiny_blip2()).eval()
    with torch.no_grad():
        for p in blip.parameters():
            p.normal_(0, 0.5)
    blip.save_pretrained(tmp_path / "blip2")
    model = SPRCModel.from_blip2(str(tmp_path / "blip2")).eval()
    assert model.config.num_query_tokens == 8 and model.config.embed_dim == 16 and model.qformer_query is None
    assert model.vision_model.post_layernorm.eps == 1e-5  # LAVIS ln_vision
    model.vision_model.post_layernorm.eps = blip.vision_model.post_layernorm.eps  # compare like with like
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1, 120, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        itc = blip(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        itm = blip(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        target = model.get_target_embeds(pixels)
        torch.testing.assert_close(target, itc.image_embeds)
        torch.testing.assert_close(model.similarity(itc.text_embeds, target).T, itc.logits_per_image)
        # SPRC's pass 1 is BLIP-2's ITM pass: same fusion states, same ITM logits from them
        fusion = model.get_fusion_states(ids, mask, pixel_values=pixels)
        torch.testing.assert_close(model.itm_head(fusion).mean(dim=1), itm.logits_per_image)
    assert not any(p.requires_grad for n, p in model.vision_model.named_parameters() if "post_layernorm" not in n)
    model.save_pretrained(tmp_path / "sprc")
    again = AutoModel.from_pretrained(tmp_path / "sprc")
    assert not any(p.requires_grad for n, p in again.vision_model.named_parameters() if "post_layernorm" not in n)
    again.untie_query_side()
    again.save_pretrained(tmp_path / "sprc_stage2")
    reloaded = AutoModel.from_pretrained(tmp_path / "sprc_stage2")
    assert reloaded.qformer_query is not None
    torch.testing.assert_close(reloaded.qformer_query.text_projection.weight, blip.text_projection.weight)
