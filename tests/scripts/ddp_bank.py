"""Run under `torchrun --standalone --nproc_per_node 2 ddp_bank.py OUT BANK_DIR`: on 2 gloo ranks,
(1) the sharded full-bank loss (each rank holds half the bank) and the unsharded loss, with DDP-averaged gradients
of a small query model, for an even (4 + 4) and an uneven (3 + 5) split of an 8-query global batch;
(2) the candidate bank built over both ranks, stored in BANK_DIR and in memory, and extra negatives appended to it
the same two ways. Rank 0 saves everything to OUT."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from _dist import init_gloo, save_from_rank0  # this folder: the script's own
from conftest import solid_images, tiny_model


class Query(torch.nn.Module):
    """A query side with a learnable temperature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.log_tau = torch.nn.Parameter(torch.tensor(-2.5))

    def forward(self, x):
        return torch.nn.functional.normalize(self.proj(x), dim=-1), self.log_tau.exp()


def problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8, generator=g)
    bank = torch.nn.functional.normalize(torch.randn(13, 8, generator=g), dim=-1)
    targets = torch.tensor([0, 12, 6, 7, 3, 9, 6, 1])  # rows on both halves, one row twice
    return x, bank, targets


def losses(out):
    from trainers.losses import CandidateBankLoss, ShardedCandidateBankLoss, shard_bounds

    rank, world = dist.get_rank(), dist.get_world_size()
    x, bank, targets = problem()
    start, stop = shard_bounds(len(bank), rank, world)
    for split, bounds in (("even", (0, 4, 8)), ("uneven", (0, 3, 8))):
        rows = slice(bounds[rank], bounds[rank + 1])
        for kind in ("sharded", "full"):
            model = Query()
            ddp = DistributedDataParallel(model)
            q, tau = ddp(x[rows])
            if kind == "sharded":
                loss_fn = ShardedCandidateBankLoss(bank[start:stop], start, len(bank))
            else:
                loss_fn = CandidateBankLoss(bank)
            loss = loss_fn(q, targets[rows], tau)
            loss.backward()
            values = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(values, loss.detach().reshape(1))
            rows_held = [None] * world
            dist.all_gather_object(rows_held, int(loss_fn.bank.shape[0]))
            out[f"{kind}-{split}"] = {"losses": torch.cat(values), "rows_held": rows_held,
                                      "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def banks(out, bank_dir):
    import datasets

    from modeling_spn4cir.image_store import ImageStore
    from modeling_spn4cir import CLIP4CIRImageProcessor
    from trainers.bank_extras import ExtraImages, add_extra_negatives
    from trainers.candidate_bank import load_or_build_candidate_bank

    ids = [f"c{i}" for i in range(7)]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(7)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    model = tiny_model("vit", "sum").eval()
    import trainers.candidate_bank as cb

    encoded, original = [], cb.encode_images

    def recording(fn, images, image_ids, *args, **kwargs):
        encoded.extend(image_ids)
        return original(fn, images, image_ids, *args, **kwargs)

    cb.encode_images = recording
    for where in ("dir", "memory"):
        encoded.clear()
        bank = load_or_build_candidate_bank(model, ImageStore(corpus), ids, CLIP4CIRImageProcessor(size=32),
                                            bank_dir=bank_dir if where == "dir" else None, batch_size=2,
                                            show_progress_bar=False, shard_size=2)
        reference = bank.reference_features
        out[f"bank-{where}"] = {"target": bank.target_embeds,
                                "reference": reference if torch.is_tensor(reference) else reference.to_tensor(),
                                "fingerprint": bank.fingerprint}
        out[f"bank-{where}"]["encoded_by_rank"] = _per_rank(encoded)
        encoded.clear()
        extra = add_extra_negatives(bank, model, ExtraImages(ImageStore(extra_corpus()), EXTRA_IDS, "pool"),
                                    ImageStore(corpus), CLIP4CIRImageProcessor(size=32),
                                    bank_dir=bank_dir if where == "dir" else None, batch_size=2,
                                    show_progress_bar=False, shard_size=2).extra
        out[f"extra-{where}"] = {"target": extra.target_embeds, "fingerprint": extra.fingerprint,
                                 "encoded_by_rank": _per_rank(encoded)}


EXTRA_IDS = [f"e{i}" for i in range(5)]


def extra_corpus():
    """Five images in no triplet, appended to the bank as negatives (2 + 2 + 1 rows: shards for both ranks)."""
    import datasets

    return datasets.Dataset.from_dict({"image_id": EXTRA_IDS, "image": solid_images(5, seed=11)},
                                      features=datasets.Features({"image_id": datasets.Value("string"),
                                                                  "image": datasets.Image()}))


def _per_rank(values) -> list:
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, list(values))
    return per_rank


def main(out_path, bank_dir):
    init_gloo()
    out = {}
    losses(out)
    banks(out, bank_dir)
    save_from_rank0(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
