"""Caption a corpus in resumable shards, split across processes.

Captioning a real training set with an MLLM takes hours: results are written shard by shard
(`captions-00000.jsonl`, ...) as they finish, a restarted run skips finished shards, and under
`torchrun` / `accelerate launch` process r takes shards r, r + W, r + 2W, ...
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from modeling_spn4cir.atomic import atomic_write_bytes, atomic_write_json
from modeling_spn4cir.distributed import world

MANIFEST = "manifest.json"


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def captioner_key(captioner) -> str:
    """What identifies a captioner's output in the cache (class and its prompt settings)."""
    names = ("prompt", "prompt_prefix", "num_words", "word_limit", "max_new_tokens", "phrases", "top_k", "column")
    fields = {k: getattr(captioner, k) for k in names if hasattr(captioner, k)}
    return json.dumps({"class": type(captioner).__name__, **fields}, sort_keys=True, default=str)


def caption_corpus(corpus, captioner, cache_dir: str | Path, shard_size: int = 1000, batch_size: int = 16,
                   show_progress_bar: bool = True) -> dict[str, str]:
    """`{image_id: caption}` for every image of `corpus` (first row of each id), resuming from `cache_dir`."""
    cache_dir = Path(cache_dir)
    first_row: dict[str, int] = {}
    for row, image_id in enumerate(corpus["image_id"]):
        first_row.setdefault(image_id, row)
    ids = list(first_row)
    shards = [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]
    manifest = {"num_images": len(ids), "shard_size": shard_size, "first_ids": ids[:3], "last_ids": ids[-3:],
                "captioner": captioner_key(captioner)}
    rank, world_size = world(from_env=True)
    manifest_path = cache_dir / MANIFEST
    if manifest_path.exists():
        stored = json.loads(manifest_path.read_text())
        if stored != manifest:
            changed = sorted(k for k in manifest if stored.get(k) != manifest[k])
            raise ValueError(
                f"{cache_dir} holds captions of another run ({', '.join(changed)} differ); use a new cache_dir or "
                "delete this one."
            )
    elif rank == 0:
        atomic_write_json(manifest_path, manifest, indent=1)
    columns = [c for c in corpus.column_names if c in ("image", "image_id", "category") or c == getattr(captioner, "column", None)]
    mine = [i for i in range(len(shards)) if i % world_size == rank]
    todo = [i for i in mine if not (cache_dir / f"captions-{i:05d}.jsonl").exists()]
    with tqdm(total=sum(len(shards[i]) for i in todo), desc=f"Captioning (rank {rank})",
              disable=not show_progress_bar) as bar:
        for shard in todo:
            lines = []
            for start in range(0, len(shards[shard]), batch_size):
                batch_ids = shards[shard][start:start + batch_size]
                batch = corpus.select([first_row[i] for i in batch_ids]).select_columns(columns)[:]
                captions = captioner(batch)
                if len(captions) != len(batch_ids):
                    raise RuntimeError(f"The captioner returned {len(captions)} captions for {len(batch_ids)} images.")
                lines += [json.dumps({"image_id": i, "caption": c}) for i, c in zip(batch_ids, captions)]
                bar.update(len(batch_ids))
            atomic_write_bytes(cache_dir / f"captions-{shard:05d}.jsonl", ("\n".join(lines) + "\n").encode())
    _barrier()
    missing = [i for i in range(len(shards)) if not (cache_dir / f"captions-{i:05d}.jsonl").exists()]
    if missing:
        raise RuntimeError(
            f"Caption shards {missing[:10]} are missing in {cache_dir} (another process has not finished or "
            "crashed); run again to resume."
        )
    captions = {}
    for i in range(len(shards)):
        for line in (cache_dir / f"captions-{i:05d}.jsonl").read_text().splitlines():
            record = json.loads(line)
            captions[record["image_id"]] = record["caption"]
    return captions
