"""Every converted family trains through `run_cir.py`: stage 1 moves both sides with the family's own objective,
stage 2 moves only `query_side_parameters()` (the image side stays bit-identical), and both evaluate."""

import importlib
import json

import pytest
import run_cir
import torch
from conftest import FIXTURES, tiny_tokenizer
from safetensors.torch import load_file

FAMILIES = {
    # family: (stage-1 checkpoint, tokenizer source, heads that the tiny fixtures use)
    "blip4cir": ("spn4cir_blip4cir_stage1.pt", "vocab.txt", lambda m: [f"text={m['geometry']['text_heads']}",
                                                                        f"vision={m['geometry']['vision_heads']}"]),
    "tgcir": ("spn4cir_tgcir_stage1.pt", "tiny", lambda m: [f"text={m['geometry']['transformer_heads']}",
                                                            f"vision={m['derived']['vision_heads']}"]),
    "sprc": ("sprc_stage1.pt", "vocab.txt", lambda m: [f"vision={m['vision']['num_attention_heads']}",
                                                       f"qformer={m['qformer']['num_attention_heads']}"]),
}


def _convert(family, tmp_path):
    checkpoint, tokenizer, heads = FAMILIES[family]
    parity = FIXTURES / f"parity_{family}"
    meta = json.loads((parity / "meta.json").read_text())
    if tokenizer == "tiny":
        tiny_tokenizer(["make it blue", "red circle", "and more"]).save_pretrained(tmp_path / "tok")
        tokenizer = str(tmp_path / "tok")
    else:
        tokenizer = str(parity / tokenizer)
    converter = importlib.import_module(f"modeling_spn4cir.{family}.convert_{family}_original_checkpoint")
    return converter.convert_original_checkpoint(parity / checkpoint, tmp_path / "model", tokenizer=tokenizer,
                                                 num_heads=heads(meta))


def _run(model_dir, dataset, out, stage, bank=None, extra=()):
    args = ["--model_name_or_path", str(model_dir), "--dataset", str(dataset), "--stage", stage, "--do_train",
            "--do_eval", "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
            "--save_strategy", "no", "--per_device_eval_batch_size", "8"]
    return run_cir.main(args + (["--bank_dir", str(bank)] if bank else []) + list(extra))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_both_stages_through_run_cir(family, tiny_cir_dataset, tmp_path):
    from modeling_spn4cir.loading import load_cir_model_and_processor

    start = _convert(family, tmp_path)
    initial = load_file(start / "model.safetensors")

    stage1 = _run(start, tiny_cir_dataset, tmp_path / "stage1", "in_batch")
    after1 = load_file(tmp_path / "stage1" / "model.safetensors")
    model, _ = load_cir_model_and_processor(str(tmp_path / "stage1"))
    model.untie_query_side()  # what stage 2 starts from (SPRC makes its query-side copy here)
    model.freeze_target_side()
    ids = {id(q) for q in model.query_side_parameters()}
    query_side = {n for n, p in model.named_parameters() if id(p) in ids}
    start2 = {k: v.clone() for k, v in model.state_dict().items()}
    moved1 = {k for k in initial if k in after1 and not torch.equal(initial[k], after1[k])}
    assert moved1 - query_side, "stage 1 must train the image side too"
    assert 0.0 <= stage1["eval_recall@10"] <= 100.0 and stage1["train_loss"] > 0

    _run(tmp_path / "stage1", tiny_cir_dataset, tmp_path / "stage2", "candidate_bank", tmp_path / "bank")
    after2 = load_file(tmp_path / "stage2" / "model.safetensors")
    moved2 = {k for k in start2 if k in after2 and not torch.equal(start2[k], after2[k])}
    assert moved2 and moved2 <= query_side, sorted(moved2 - query_side)[:5]


def test_run_cir_builds_a_family_on_a_base_checkpoint(tiny_clip_dir, tiny_cir_dataset, tmp_path):
    from modeling_spn4cir import CLIP4CIRModel, TGCIRModel
    from modeling_spn4cir.loading import load_cir_model_and_processor

    assert isinstance(load_cir_model_and_processor(str(tiny_clip_dir))[0], CLIP4CIRModel)
    model, processor = load_cir_model_and_processor(str(tiny_clip_dir), model_type="tgcir")
    assert isinstance(model, TGCIRModel) and type(processor).__name__ == "TGCIRProcessor"
    with pytest.raises(ValueError, match="sprc cannot start from a 'clip' checkpoint"):
        load_cir_model_and_processor(str(tiny_clip_dir), model_type="sprc")
    args = ["--model_name_or_path", str(tiny_clip_dir), "--model_type", "tgcir", "--dataset", str(tiny_cir_dataset),
            "--stage", "in_batch", "--do_train", "--output_dir", str(tmp_path / "tg"), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
            "--save_strategy", "no"]
    results = run_cir.main(args)
    assert results["train_loss"] > 0
    saved, _ = load_cir_model_and_processor(str(tmp_path / "tg"))
    assert isinstance(saved, TGCIRModel) and saved.config.stage1_loss == "tgcir"


def test_blip4cir_plus_bi_stage1_through_run_cir(tiny_cir_dataset, tmp_path):
    """+Bi (Bi-BLIP4CIR): the reversed-query objective trains the new reversal token along with the towers."""
    start = _convert("blip4cir", tmp_path)
    _run(start, tiny_cir_dataset, tmp_path / "bi", "in_batch", extra=["--bidirectional"])
    config = json.loads((tmp_path / "bi" / "config.json").read_text())
    assert config["bidirectional"] and config["stage1_loss"] == "blip4cir_bidirectional"
    assert any("reversal" in k for k in load_file(tmp_path / "bi" / "model.safetensors"))
    assert '"reverse_weight": 0.4' in (tmp_path / "bi" / "README.md").read_text()  # the +Bi objective trained it


@pytest.mark.parametrize("family", ["clip4cir", *sorted(FAMILIES)])
def test_a_text_longer_than_the_text_tower_is_truncated_never_a_crash(family, tiny_model_dir, tmp_path):
    """One text-length rule per family, in its processor: truncation at the text tower's positions (BLIP4CIR used
    to pass 1802 tokens to a 40-position encoder: "size of tensor a (1802) must match ..."), so training, evaluation
    and the retrieval pipeline encode any text; a text that fits is encoded as before."""
    from PIL import Image

    from modeling_spn4cir.loading import load_cir_model_and_processor
    from trainers.text import tokenize

    model, processor = load_cir_model_and_processor(str(tiny_model_dir if family == "clip4cir"
                                                        else _convert(family, tmp_path)))
    model.eval()
    long, short = " ".join(["red circle"] * 900), "red circle"
    batch = tokenize(processor, [long, short])
    text_config = getattr(model.config, "text_config", None) or model.config.qformer_config
    assert batch["input_ids"].shape[1] <= min(processor.tokenizer.model_max_length,
                                              text_config.max_position_embeddings) < 1800
    size = model.config.image_size
    pixels = processor.image_processor([Image.new("RGB", (size, size), (200, 30, 30))] * 2,
                                       return_tensors="pt")["pixel_values"]
    alone = tokenize(processor, [short])
    with torch.no_grad():
        query = model.get_query_embeds(batch["input_ids"], batch["attention_mask"], pixel_values=pixels)
        single = model.get_query_embeds(alone["input_ids"], alone["attention_mask"], pixel_values=pixels[:1])
    assert torch.isfinite(query).all()
    torch.testing.assert_close(query[1], single[0], atol=1e-5, rtol=1e-4)
