"""Losses against naive per-sample computations; duplicate masking; 2-process gradients equal 1-process."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_same_gradients,
    tiny_inputs,
    tiny_model,
    two_process_gradients,
)

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


def test_sampled_negatives_are_a_uniform_subset_without_the_positive():
    k, n = 12, 7
    bank = _unit(k, 8, 7)
    loss_fn = CandidateBankLoss(bank, temperature=0.05, num_negatives=n, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([3] * 6000)
    negatives = loss_fn.sample_negatives(target)
    assert negatives.shape == (6000, n)
    assert not (negatives == 3).any() and negatives.min() >= 0 and negatives.max() < k
    assert all(len(set(row)) == n for row in negatives.tolist())  # no repeats within a row (random.sample)
    counts = torch.bincount(negatives.flatten(), minlength=k).double()
    others = torch.cat([counts[:3], counts[4:]])
    expected = 6000 * n / (k - 1)
    chi2 = float(((others - expected) ** 2 / expected).sum())
    assert chi2 < 31.3  # chi-square, 10 degrees of freedom, p = 0.0005: uniform over the other rows


def test_all_other_rows_as_sampled_negatives_equal_the_full_bank_loss():
    q, bank = _unit(16, 8, 6), _unit(10, 8, 7)
    idx = torch.randint(10, (16,), generator=torch.Generator().manual_seed(0))
    full = CandidateBankLoss(bank, temperature=0.05)(q, idx)
    sampled = CandidateBankLoss(bank, temperature=0.05, num_negatives=9)(q, idx)  # every other row, shuffled
    torch.testing.assert_close(sampled, full)


def test_half_precision_bank_keeps_the_query_precision():
    q, bank = _unit(16, 8, 6).float().requires_grad_(), _unit(10, 8, 7).float()
    idx = torch.randint(10, (16,), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        loss = CandidateBankLoss(bank.to(dtype), temperature=0.05)(q, idx)
        assert loss.dtype == torch.float32
        reference = CandidateBankLoss(bank.to(dtype).float(), temperature=0.05)(q, idx)
        assert float(loss) == float(reference)  # scored in fp32 against the stored values


def test_num_negatives_must_leave_the_positive_out():
    bank = _unit(10, 8, 7)
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
                            pixel_values=batch["pixel_values"], target_pixel_values=batch["target_pixel_values"])
        return InBatchInfoNCELoss(model.config.temperature)(out.query_embeds, out.target_embeds, batch["target_keys"])
    out = forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        reference_features=batch["reference_features"])
    return CandidateBankLoss(batch["bank"], model.config.temperature)(out.query_embeds, batch["target_index"])


@pytest.mark.slow
def test_two_process_gradients_equal_one_process(tmp_path):
    ddp = two_process_gradients("ddp_gradients.py", tmp_path)
    for stage in ("in_batch", "candidate_bank"):
        model = tiny_model("vit", "combiner", seed=0)
        model.eval()
        if stage == "candidate_bank":
            model.freeze_target_side()
        stage_loss(model, model, global_batch(model), stage).backward()
        single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if stage == "candidate_bank":
            assert not any(n.startswith("vision_model") for n in single)
        for split in ("even", "uneven"):  # 4 + 4 rows, and 3 + 5 rows: both equal the one-process gradient
            assert_same_gradients(ddp[f"{stage}-{split}"], single, f"{stage}-{split}")
