"""The negative types of SPN's study: parity with the original's `CIRPlus.forward` (all 15 `--neg_type`
combinations, loss and gradients), the vectorized loss against a per-example loop, the chunked fusion path, the
fusions that are refused, 2-process gradients, and `--negative_types` through run_cir.py."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FIXTURES,
    assert_same_gradients,
    tiny_inputs,
    tiny_model,
    two_process_gradients,
)

from trainers.losses import (
    InBatchInfoNCELoss,
    NegativeTypeLoss,
    check_negative_types,
    negative_type_loss,
    negative_types_from_bits,
    stage1_loss_for,
)

PARITY = FIXTURES / "parity_negtype"
INPUTS = ("reference_features", "text_features", "target_features")
ALL_TYPES = ("target", "query", "text", "reference")


# ------------------------------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def negtype():
    from safetensors.torch import load_file

    meta = json.loads((PARITY / "meta.json").read_text())
    return meta, load_file(PARITY / "negtype.safetensors")


@pytest.mark.parametrize("neg_type", range(1, 16))
def test_parity_with_the_original_for_every_neg_type(negtype, neg_type):
    meta, tensors = negtype
    inputs = [tensors[name].clone().requires_grad_() for name in INPUTS]
    assert all(x.shape == (meta["batch"], meta["dim"]) for x in inputs)  # the fixture's own geometry
    reference, text, target = inputs
    loss = negative_type_loss(reference, text, F.normalize(target, dim=-1), meta["tau"],
                              negative_types_from_bits(neg_type))
    loss.backward()
    tolerance = meta["tolerance"]
    assert abs(loss.item() - tensors[f"neg_type_{neg_type}.loss"].item()) <= tolerance
    for name, x in zip(INPUTS, inputs):
        error = (x.grad - tensors[f"neg_type_{neg_type}.grad_{name}"]).abs().max().item()
        assert error <= tolerance, f"neg_type {neg_type}: gradient of {name} off by {error}"


def test_bits_name_the_types_of_the_original():
    assert negative_types_from_bits(4) == ("target",)
    assert negative_types_from_bits(8) == ("query",)
    assert negative_types_from_bits(2) == ("text",)
    assert negative_types_from_bits(1) == ("reference",)
    assert set(negative_types_from_bits(15)) == set(ALL_TYPES)
    with pytest.raises(ValueError, match="1..15"):
        negative_types_from_bits(16)


# ------------------------------------------------------------------------------ against a loop
def _ce(scores, right):
    return -scores[right] + math.log(sum(math.exp(s) for s in scores))


def loop_loss(r, s, t_raw, tau, types):
    """Each type's InfoNCE written per example and per candidate, in float64 Python arithmetic."""
    t = [F.normalize(x, dim=0) for x in t_raw]
    q = [F.normalize(a + b, dim=0) for a, b in zip(r, s)]
    n = len(r)
    per_type = {
        "target": [_ce([float(q[i] @ t[j]) / tau for j in range(n)], i) for i in range(n)],
        "query": [_ce([float(t[i] @ q[j]) / tau for j in range(n)], i) for i in range(n)],
        "text": [_ce([float(F.normalize(r[i] + s[j], dim=0) @ t[i]) / tau for j in range(n)], i) for i in range(n)],
        "reference": [_ce([float(F.normalize(r[j] + s[i], dim=0) @ t[i]) / tau for j in range(n)], i)
                      for i in range(n)],
    }
    return sum(sum(per_type[kind]) / n for kind in types) / len(types)


@pytest.mark.parametrize("batch,dim,tau,seed", [(5, 7, 0.1, 0), (11, 4, 0.05, 1), (3, 32, 0.3, 2)])
def test_vectorized_loss_equals_a_per_example_loop(batch, dim, tau, seed):
    g = torch.Generator().manual_seed(seed)
    r, s, t = (torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(3))
    for types in (("reference",), ("text",), ("query",), ("target", "text"), ALL_TYPES):
        got = negative_type_loss(r, s, F.normalize(t, dim=-1), tau, types)
        assert got.item() == pytest.approx(loop_loss(r, s, t, tau, types), rel=1e-9), types


def test_duplicate_targets_are_masked_for_target_and_query_only():
    g = torch.Generator().manual_seed(3)
    r, s = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    t = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t[3] = t[1]
    keys = torch.tensor([10, 11, 12, 11, 14])
    q = F.normalize(r + s, dim=-1)
    masked = NegativeTypeLoss(["target"], 0.1)(q, t, keys)
    torch.testing.assert_close(masked, InBatchInfoNCELoss(0.1)(q, t, keys))  # `target` alone is stage 1's loss
    for kind in ("query", "target"):
        with_keys = NegativeTypeLoss([kind], 0.1)(q, t, keys)
        assert with_keys < NegativeTypeLoss([kind], 0.1)(q, t)  # the copy no longer counts as a negative
    for kind in ("text", "reference"):  # the original masks nothing there
        loss = NegativeTypeLoss([kind], 0.1)
        torch.testing.assert_close(loss(q, t, keys, reference_features=r, text_features=s),
                                   loss(q, t, reference_features=r, text_features=s))


# ------------------------------------------------------------------------------ other fusions
def test_chunked_composition_equals_the_closed_form_and_its_gradients():
    g = torch.Generator().manual_seed(4)
    r, s, t_raw = (torch.randn(7, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))

    def run(loss_fn):
        t = F.normalize(t_raw, dim=-1)
        loss = loss_fn(F.normalize(r + s, dim=-1), t, reference_features=r, text_features=s)
        return [loss, *torch.autograd.grad(loss, (r, s, t_raw))]

    closed = run(NegativeTypeLoss(ALL_TYPES, 0.07))
    chunked = run(NegativeTypeLoss(ALL_TYPES, 0.07, compose=lambda a, b: F.normalize(a + b, dim=-1),
                                   pairs_per_chunk=10))  # 1 row of 7 pairs per chunk
    for a, b in zip(closed, chunked):
        torch.testing.assert_close(a, b)


def test_combiner_composes_every_pair_of_the_batch():
    model = tiny_model("vit", "combiner").eval()  # no dropout: one function
    loss_fn = stage1_loss_for(model, 0.1, model.similarity, negative_types=["text", "reference"])
    assert loss_fn.compose == model.combine and loss_fn.model_kwargs == {"return_fusion_features": True}
    inputs = tiny_inputs(model, batch=4)
    out = model(**inputs, **loss_fn.model_kwargs)
    r, s, t = out.reference_features, out.text_features, out.target_embeds
    assert torch.allclose(out.query_embeds, model.combine(r, s))
    loss = loss_fn.loss_from_outputs(out)
    expected = 0.0
    for i in range(4):
        text = torch.stack([model.combine(r[i:i + 1], s[j:j + 1])[0] @ t[i] for j in range(4)]) / 0.1
        reference = torch.stack([model.combine(r[j:j + 1], s[i:i + 1])[0] @ t[i] for j in range(4)]) / 0.1
        expected = expected + (F.cross_entropy(text[None], torch.tensor([i]))
                               + F.cross_entropy(reference[None], torch.tensor([i]))) / 2
    torch.testing.assert_close(loss, expected / 4, rtol=1e-5, atol=1e-6)


def test_sum_fusion_uses_the_closed_form():
    model = tiny_model("vit", "sum")
    loss_fn = stage1_loss_for(model, 0.1, model.similarity, negative_types=["reference"])
    assert isinstance(loss_fn, NegativeTypeLoss) and loss_fn.compose is None
    assert isinstance(stage1_loss_for(model, 0.1, model.similarity), InBatchInfoNCELoss)  # the default is unchanged


def test_a_fusion_without_feature_vectors_refuses_text_and_reference():
    from toy_family import ToyCIRConfig, ToyCIRModel

    model = ToyCIRModel(ToyCIRConfig(stage1_loss="in_batch_infonce"))
    with pytest.raises(ValueError, match=r"B x B.*no fusion of two feature vectors.*target and/or query"):
        stage1_loss_for(model, 0.1, model.similarity, negative_types=["target", "text"])
    query = stage1_loss_for(model, 0.1, model.similarity, negative_types=["query"])
    assert isinstance(query, NegativeTypeLoss) and query.model_kwargs == {}


def test_unknown_type_names_the_choices():
    with pytest.raises(ValueError, match="target query text reference"):
        check_negative_types(["target", "caption"])
    with pytest.raises(ValueError, match="one or more"):
        check_negative_types([])


def test_cross_types_need_the_fusion_features():
    q, t = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="return_fusion_features"):
        NegativeTypeLoss(["text"], 0.1)(q, t)


# ------------------------------------------------------------------------- distributed gradients
def negative_types_batch(model, n=8):
    inputs = tiny_inputs(model, batch=n, seed=5)
    inputs["target_pixel_values"][6] = inputs["target_pixel_values"][1]  # one target twice, across the ranks
    inputs["target_keys"] = torch.tensor([0, 1, 2, 3, 4, 5, 1, 7])
    return inputs


def negative_types_loss(forward_model, model, batch):
    loss_fn = stage1_loss_for(model, 0.1, model.similarity, negative_types=ALL_TYPES)
    inputs = {k: v for k, v in batch.items() if k != "target_keys"}
    return loss_fn.loss_from_outputs(forward_model(**inputs, **loss_fn.model_kwargs), batch["target_keys"])


@pytest.mark.slow
def test_two_process_gradients_equal_one_process(tmp_path):
    ddp = two_process_gradients("ddp_negative_types.py", tmp_path)
    for fusion in ("sum", "combiner"):
        model = tiny_model("vit", fusion, seed=0).eval()
        negative_types_loss(model, model, negative_types_batch(model)).backward()
        single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert any(n.startswith("vision_model") for n in single) and any(n.startswith("text_model") for n in single)
        for split in ("even", "uneven"):  # 4 + 4 and 3 + 5 rows: both equal the one-process gradients
            assert_same_gradients(ddp[f"{fusion}-{split}"], single, f"{fusion}-{split}")


# ------------------------------------------------------------------------------------- run_cir.py
def test_run_cir_trains_stage1_with_negative_types(tiny_cir_dataset, tiny_model_dir, tmp_path):
    import run_cir  # examples/: not on the 2-process script's path, which imports this module

    out = tmp_path / "run"
    run_cir.main(["--model_name_or_path", str(tiny_model_dir), "--dataset", str(tiny_cir_dataset), "--stage",
                  "in_batch", "--do_train", "--output_dir", str(out), "--per_device_train_batch_size", "4",
                  "--max_steps", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
                  "--save_strategy", "no", "--negative_types", "reference", "text", "query", "target"])
    card = (out / "README.md").read_text()
    assert '"negative_types": ["query", "target", "text", "reference"]' in card
    assert json.loads((out / "all_results.json").read_text())["train_loss"] > 0


def test_run_cir_refuses_negative_types_in_stage2_and_unknown_names(capsys):
    import run_cir

    with pytest.raises(ValueError, match="stage-1 option"):
        run_cir.parse_args(["--dataset", "x", "--stage", "candidate_bank", "--negative_types", "text"])
    with pytest.raises(SystemExit):
        run_cir.parse_args(["--dataset", "x", "--negative_types", "caption"])
    assert "choose from 'target', 'query', 'text', 'reference'" in capsys.readouterr().err
