"""Run under `torchrun --nproc_per_node 2 ddp_shard_store.py OUT STORE_DIR`: on 2 gloo ranks, a store of 10 rows
in shards of 2 built in STORE_DIR, then again after two shards were lost, then in memory; each rank records the
shards it built and the rows it got. Rank 0 writes everything to OUT (JSON)."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from _dist import init_gloo

ROWS = [f"r{i}" for i in range(10)]


def run(directory) -> dict:
    from modeling_spn4cir.storage import RecordsCodec, ShardPlan, ShardStore

    store = ShardStore(directory, "rows", RecordsCodec(), "test store")
    blocks = store.blocks(len(ROWS), 2)
    plans = [ShardPlan(a, b, {"shard": k}) for k, (a, b) in enumerate(blocks)]
    built = []

    def build(job):
        built.append(job.index)
        return [{"row": r} for r in ROWS[job.plan.start:job.plan.stop]]

    shards = store.sync(plans, build, store.manifests(len(plans)), {})
    rows = [r["row"] for shard in shards for r in store.read(shard)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"built": built, "rows": rows})
    return {"built": [g["built"] for g in gathered], "rows": [g["rows"] for g in gathered],
            "blocks": [list(b) for b in blocks]}


def main(out_path, store_dir):
    init_gloo()
    out = {"first": run(store_dir)}
    dist.barrier()
    if dist.get_rank() == 0:
        for k in (1, 3):
            (Path(store_dir) / f"rows-{k:05d}.jsonl").unlink()
    dist.barrier()
    out["resumed"] = run(store_dir)
    out["memory"] = run(None)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
