"""Two gloo processes: the sharded full-bank loss equals the one-process loss and gradients, and a bank built
over both ranks equals one built by one process."""

import datasets
import ddp_bank
import pytest
import torch
from conftest import run_two_processes, solid_images, tiny_model

from datasets_scripts.image_store import ImageStore
from modeling_spn4cir import CLIP4CIRImageProcessor
from trainers.candidate_bank import load_or_build_candidate_bank
from trainers.losses import CandidateBankLoss


@pytest.mark.slow
def test_two_process_sharded_bank_loss_gradients_and_split_build(tmp_path):
    out = tmp_path / "out.pt"
    run_two_processes("ddp_bank.py", out, tmp_path / "bank")
    got = torch.load(out, weights_only=True)

    # one process, the whole batch against the whole bank
    x, bank, targets = ddp_bank.problem()
    model = ddp_bank.Query()
    q, tau = model(x)
    single = CandidateBankLoss(bank)(q, targets, tau)
    single.backward()
    for split in ("even", "uneven"):
        sharded, full = got[f"sharded-{split}"], got[f"full-{split}"]
        # each rank's loss is the unsharded loss of its queries; their mean is the global loss
        torch.testing.assert_close(sharded["losses"], full["losses"], atol=1e-6, rtol=0)
        torch.testing.assert_close(sharded["losses"].mean(), single.detach(), atol=1e-6, rtol=0)
        for name, param in model.named_parameters():  # DDP-averaged gradients = one-process gradients
            torch.testing.assert_close(sharded["grads"][name], param.grad, atol=1e-5, rtol=0, msg=f"{split} {name}")
        assert sharded["grads"]["log_tau"].abs() > 0  # the temperature's gradient crosses the shards too
        assert sharded["rows_held"] == [6, 7] and full["rows_held"] == [13, 13]  # each rank holds 1/W of the bank

    # the bank built over two ranks (stored, and in memory) equals one process's
    ids = [f"c{i}" for i in range(7)]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(7)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    one = load_or_build_candidate_bank(tiny_model("vit", "sum").eval(), ImageStore(corpus), ids,
                                       CLIP4CIRImageProcessor(size=32), batch_size=2, show_progress_bar=False,
                                       shard_size=2)
    for where in ("dir", "memory"):
        two = got[f"bank-{where}"]
        torch.testing.assert_close(two["target"], one.target_embeds)
        torch.testing.assert_close(two["reference"], one.reference_features)
        assert two["fingerprint"] == one.fingerprint
        first, second = two["encoded_by_rank"]  # both ranks encoded, each image once
        assert first and second and sorted(first + second) == ids
    assert sorted(p.name for p in (tmp_path / "bank").glob("bank-*.safetensors")) == [
        f"bank-{k:05d}.safetensors" for k in range(4)]
