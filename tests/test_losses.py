"""Losses against naive per-sample computations; duplicate masking; 2-process gradients equal 1-process."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_inputs, tiny_model

from trainers.losses import CandidateBankLoss, InBatchInfoNCELoss


def naive_in_batch(q, t, keys, tau):
    total = 0.0
    for i in range(len(q)):
        negatives = [j for j in range(len(t)) if j != i and (keys is None or keys[j] != keys[i])]
        pos = math.exp(float(q[i] @ t[i]) / tau)
        denominator = pos + sum(math.exp(float(q[i] @ t[j]) / tau) for j in negatives)
        total += -math.log(pos / denominator)
    return total / len(q)


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1).double()


def test_in_batch_equals_naive():
    q, t = _unit(6, 8, 0), _unit(6, 8, 1)
    loss = InBatchInfoNCELoss(temperature=0.1)(q, t)
    assert float(loss) == pytest.approx(naive_in_batch(q, t, None, 0.1), rel=1e-9)


def test_duplicate_target_is_masked_not_a_negative():
    q, t = _unit(5, 8, 2), _unit(5, 8, 3)
    t[3] = t[1]  # the same target image twice
    keys = torch.tensor([10, 11, 12, 11, 14])
    masked = InBatchInfoNCELoss(temperature=0.1)(q, t, keys)
    assert float(masked) == pytest.approx(naive_in_batch(q, t, keys.tolist(), 0.1), rel=1e-9)
    unmasked = InBatchInfoNCELoss(temperature=0.1)(q, t)
    assert float(unmasked) > float(masked)  # counting the copy as a negative only adds to the loss


def test_candidate_bank_full_equals_naive():
    q, bank = _unit(4, 8, 4), _unit(20, 8, 5)
    idx = torch.tensor([3, 0, 19, 7])
    loss = CandidateBankLoss(bank, temperature=0.05)(q, idx)
    naive = sum(-math.log(math.exp(float(q[i] @ bank[idx[i]]) / 0.05) /
                          sum(math.exp(float(q[i] @ bank[k]) / 0.05) for k in range(20))) for i in range(4)) / 4
    assert float(loss) == pytest.approx(naive, rel=1e-9)


def test_candidate_bank_sampled_negatives():
    q, bank = _unit(64, 8, 6), _unit(10, 8, 7)
    idx = torch.randint(10, (64,), generator=torch.Generator().manual_seed(0))
    loss_fn = CandidateBankLoss(bank, temperature=0.05, num_negatives=9)
    # reproduce the loss's own draw to recompute it naively
    torch.manual_seed(0)
    draws = torch.randint(9, (64, 9))
    torch.manual_seed(0)
    loss = loss_fn(q, idx)
    negatives = draws + (draws >= idx[:, None]).long()
    assert not (negatives == idx[:, None]).any() and negatives.max() < 10
    naive = 0.0
    for i in range(64):
        cand = [int(idx[i])] + negatives[i].tolist()
        scores = [float(q[i] @ bank[c]) / 0.05 for c in cand]
        naive += -(scores[0] - math.log(sum(math.exp(s) for s in scores)))
    assert float(loss) == pytest.approx(naive / 64, rel=1e-9)
    with pytest.raises(ValueError, match="num_negatives"):
        CandidateBankLoss(bank, num_negatives=10)


# ------------------------------------------------------------------------- distributed gradients
def global_batch(model, n=8):
    inputs = tiny_inputs(model, batch=n, seed=3)
    inputs["target_pixel_values"][5] = inputs["target_pixel_values"][2]  # one target twice, across the ranks
    inputs["target_keys"] = torch.tensor([0, 1, 2, 3, 4, 2, 6, 7])
    with torch.no_grad():
        target, reference = model.get_target_embeds_and_reference_features(
            torch.cat([inputs["target_pixel_values"], inputs["pixel_values"]]))
    inputs["bank"] = target[:n]
    inputs["reference_features"] = reference[n:]
    inputs["target_index"] = torch.arange(n)
    return inputs


def stage_loss(forward_model, model, batch, stage):
    if stage == "in_batch":
        out = forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], target_pixel_values=batch["target_pixel_values"],
                            return_loss=False)
        return InBatchInfoNCELoss(model.config.temperature)(out.query_embeds, out.target_embeds, batch["target_keys"])
    out = forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        reference_features=batch["reference_features"], return_loss=False)
    return CandidateBankLoss(batch["bank"], model.config.temperature)(out.query_embeds, batch["target_index"])


def test_two_process_gradients_equal_one_process(tmp_path):
    out = tmp_path / "grads.pt"
    script = Path(__file__).parent / "scripts" / "ddp_gradients.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    for stage in ("in_batch", "candidate_bank"):
        model = tiny_model("vit", "combiner", seed=0)
        model.eval()
        if stage == "candidate_bank":
            model.freeze_target_side()
        stage_loss(model, model, global_batch(model), stage).backward()
        single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(single) == set(ddp[stage]), stage
        if stage == "candidate_bank":
            assert not any(n.startswith("vision_model") for n in single)
        for name, grad in single.items():
            torch.testing.assert_close(ddp[stage][name], grad, atol=1e-5, rtol=1e-4, msg=f"{stage} {name}")
