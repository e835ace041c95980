"""Parity of converted original SPN4CIR / CLIP4Cir checkpoints with the outputs of the original code."""


import pytest
import torch
from conftest import parity_fixture, run_without_package, tiny_tokenizer
from transformers import AutoModel, AutoProcessor

import modeling_spn4cir  # noqa: F401
from modeling_spn4cir import CLIP4CIRImageProcessor, CLIP4CIRModel, CLIP4CIRProcessor
from modeling_spn4cir.clip4cir.convert_clip4cir_original_checkpoint import (
    CheckpointMismatchError, convert_original_checkpoint, infer_config, load_original_model, main,
    read_original_checkpoint)

PARITY, META, TOL = parity_fixture("parity_clip4cir")


@pytest.fixture(scope="module")
def bare_openai_checkpoint(tmp_path_factory):
    """The third input format: a bare OpenAI CLIP state dict (taken from the CLIP4Cir stage-1 file)."""
    path = tmp_path_factory.mktemp("bare") / "RN_tiny.pt"
    torch.save(torch.load(PARITY / "clip4cir_rn_stage1.pt", weights_only=True)["CLIP"], path)
    return path


CASES = {
    "spn4cir_stage2_rn": ("rn", "spn4cir_clip4cir_rn_stage2.pt", None),
    "spn4cir_stage2_vit": ("vit", "spn4cir_clip4cir_vit_stage2.pt", None),
    "clip4cir_stage1_rn": ("rn", "clip4cir_rn_stage1.pt", None),
    "openai_bare_rn": ("rn", "BARE", None),
    "clip4cir_stage1_rn_combiner": ("rn", "clip4cir_rn_stage1.pt", "clip4cir_combiner.pt"),
    "spn4cir_stage2_rn_combiner": ("rn", "spn4cir_clip4cir_rn_stage2.pt", "clip4cir_combiner.pt"),
    "openai_bare_rn_combiner": ("rn", "BARE", "clip4cir_combiner.pt"),
}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            target_pixel_values=inputs["target_pixel_values"],
        )
        return {
            "reference_image_features": model.get_reference_features(inputs["pixel_values"]),
            "target_image_features": model.get_image_features(inputs["target_pixel_values"]),
            "text_features": model.get_text_features(inputs["input_ids"]),
            "target_embeds": out.target_embeds,
            "query": out.query_embeds,
            "logits_tau0.02": out.logits,
        }


@pytest.mark.parametrize("case", list(CASES))
def test_parity_through_converted_directory(case, tmp_path, inputs, expected, bare_openai_checkpoint):
    prefix, checkpoint, combiner = CASES[case]
    checkpoint = bare_openai_checkpoint if checkpoint == "BARE" else PARITY / checkpoint
    out_dir = convert_original_checkpoint(
        checkpoint, tmp_path / "converted", combiner_checkpoint=PARITY / combiner if combiner else None
    )
    assert (out_dir / "model.safetensors").exists() and (out_dir / "README.md").exists()
    assert 'pipeline("composed-image-retrieval", model="converted")' in (out_dir / "README.md").read_text()
    model = AutoModel.from_pretrained(out_dir).eval()
    assert isinstance(model, CLIP4CIRModel)
    assert model.config.fusion == ("combiner" if combiner else "sum")
    got = _outputs(model, inputs)
    for name in ("reference_image_features", "target_image_features", "text_features", "target_embeds"):
        torch.testing.assert_close(got[name], expected[f"{prefix}.{name}"], **TOL)
    if combiner:
        torch.testing.assert_close(got["query"], expected[f"{prefix}.query_embeds_combiner"], **TOL)
    else:
        torch.testing.assert_close(got["query"], expected[f"{prefix}.query_embeds_sum"], **TOL)
        torch.testing.assert_close(got["logits_tau0.02"], expected[f"{prefix}.logits_tau0.02"], **TOL)


def test_inferred_geometry_matches_meta():
    rn = infer_config(read_original_checkpoint(PARITY / "spn4cir_clip4cir_rn_stage2.pt").clip_state_dict)
    vit = infer_config(read_original_checkpoint(PARITY / "spn4cir_clip4cir_vit_stage2.pt").clip_state_dict)
    assert rn.vision_tower == "resnet" and vit.vision_tower == "vit"
    assert rn.vision_config.layers == META["rn"]["vision_layers"]
    assert rn.vision_config.width == META["rn"]["vision_width"]
    assert rn.image_size == META["rn"]["image_resolution"]
    assert rn.vision_config.num_attention_heads == META["rn"]["attnpool_heads"]
    assert vit.vision_config.num_hidden_layers == META["vit"]["vision_layers"]
    assert vit.vision_config.hidden_size == META["vit"]["vision_width"]
    assert vit.vision_config.patch_size == META["vit"]["patch_size"]
    assert vit.image_size == META["vit"]["image_resolution"]
    assert vit.vision_config.num_attention_heads == META["vit"]["heads"]
    for cfg in (rn, vit):
        assert cfg.projection_dim == META["embed_dim"]
        assert cfg.text_config.vocab_size == META["vocab_size"]
        assert cfg.text_config.max_position_embeddings == META["context_length"]
        assert cfg.text_config.num_hidden_layers == META["text"]["layers"]
        assert cfg.text_config.num_attention_heads == META["text"]["heads"]


def test_eot_pooling_is_argmax(inputs, expected):
    """OpenAI CLIP pools at the highest token id; pooling at the first id 2 (HF's other rule) would differ."""
    model, _ = load_original_model(PARITY / "spn4cir_clip4cir_vit_stage2.pt")
    ids = inputs["input_ids"].clone()
    # an id equal to the HF eos id (2) inside the text must not move the pooling position
    ids[:, 1] = 2
    with torch.no_grad():
        pooled = model.get_text_features(ids)
        model.text_model.eos_token_id = 999
        first_eot = model.get_text_features(ids)
    torch.testing.assert_close(pooled, first_eot)


def _write_variant(tmp_path, mutate):
    data = torch.load(PARITY / "spn4cir_clip4cir_rn_stage2.pt", weights_only=True)
    mutate(data["state_dict"])
    path = tmp_path / "variant.pt"
    torch.save(data, path)
    return path


def test_missing_key_is_named(tmp_path):
    path = _write_variant(tmp_path, lambda sd: sd.pop("clip.visual.layer3.0.bn2.running_var"))
    with pytest.raises(CheckpointMismatchError, match=r"vision_model\.layer3\.0\.bn2\.running_var"):
        load_original_model(path)


def test_extra_key_is_named(tmp_path):
    path = _write_variant(tmp_path, lambda sd: sd.__setitem__("clip.visual.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointMismatchError, match=r"visual\.extra_head\.weight"):
        load_original_model(path)


def test_non_clip_key_in_spn_checkpoint_is_named(tmp_path):
    path = _write_variant(tmp_path, lambda sd: sd.__setitem__("combiner.fc.weight", torch.zeros(2)))
    with pytest.raises(CheckpointMismatchError, match=r"combiner\.fc\.weight"):
        load_original_model(path)


def test_shape_mismatch_is_named(tmp_path):
    def widen(sd):
        sd["clip.ln_final.bias"] = torch.zeros(65)

    with pytest.raises(CheckpointMismatchError, match=r"text_model\.final_layer_norm\.bias.*65"):
        load_original_model(_write_variant(tmp_path, widen))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": {"clip.x": torch.zeros(1)}, "args": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_original_checkpoint(path)


def test_cli_with_tokenizer_and_trust_remote_code(tmp_path, inputs, expected):
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "spn4cir-clip4cir-vit"
    main(["--checkpoint", str(PARITY / "spn4cir_clip4cir_vit_stage2.pt"), "--output_dir", str(out),
          "--tokenizer", str(tmp_path / "tok"), "--image_size", "64"])
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, CLIP4CIRProcessor)
    assert processor.image_processor.size == 64 and processor.image_processor.preprocessing == "targetpad"
    assert processor.image_processor.target_ratio == 1.25
    assert processor.tokenizer.model_max_length == META["context_length"]
    with pytest.raises(ValueError, match="--image_size 288"):
        convert_original_checkpoint(PARITY / "spn4cir_clip4cir_vit_stage2.pt", tmp_path / "x", image_size=288)
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    stdout = run_without_package(
        f"""
        import torch
        from transformers import AutoModel, AutoImageProcessor
        model = AutoModel.from_pretrained(r"{out}", trust_remote_code=True).eval()
        ip = AutoImageProcessor.from_pretrained(r"{out}", trust_remote_code=True)
        assert type(ip).__name__ == "CLIP4CIRImageProcessor" and ip.size == 64
        x = torch.load(r"{tmp_path / 'inputs.pt'}", weights_only=True)
        with torch.no_grad():
            q = model.get_query_embeds(x["input_ids"], pixel_values=x["pixel_values"])
        torch.save(q, r"{tmp_path / 'q.pt'}")
        print("OK")
        """,
        tmp_path,
    )
    assert "OK" in stdout
    q = torch.load(tmp_path / "q.pt", weights_only=True)
    torch.testing.assert_close(q, expected["vit.query_embeds_sum"], **TOL)
    assert isinstance(CLIP4CIRImageProcessor.from_pretrained(out), CLIP4CIRImageProcessor)


def test_converter_refuses_nan_weights_naming_the_key_unless_allowed(tmp_path, caplog):
    from conftest import FIXTURES

    from modeling_spn4cir.conversion_utils import NonFiniteWeightsError
    from modeling_spn4cir.convert_original_checkpoint import main

    data = torch.load(FIXTURES / "parity_clip4cir" / "spn4cir_clip4cir_vit_stage2.pt", weights_only=True)
    data["state_dict"]["clip.text_projection"][0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(data, path)
    with pytest.raises(NonFiniteWeightsError, match=r"text_projection.*--allow_nonfinite_weights"):
        main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    with caplog.at_level("WARNING"):
        main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "allowed"), "--allow_nonfinite_weights"])
    assert (tmp_path / "allowed" / "model.safetensors").exists()
    assert "text_projection" in caplog.text and "converting anyway" in caplog.text
    # the family's own converter CLI, which the error's advice also applies to, takes the same flag
    from modeling_spn4cir.clip4cir.convert_clip4cir_original_checkpoint import main as family_main

    with pytest.raises(NonFiniteWeightsError, match="text_projection"):
        family_main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "family_refused")])
    family_main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "family"), "--allow_nonfinite_weights"])
    assert (tmp_path / "family" / "model.safetensors").exists()
