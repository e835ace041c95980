"""Caption a corpus in resumable shards, split across processes.

Captioning a real training set with an MLLM takes hours: results are written shard by shard
(`captions-00000.jsonl`, ...) as they finish, a restarted run skips finished shards, and under
`torchrun` / `accelerate launch` process r takes shards r, r + W, r + 2W, ...

Each cached caption is keyed by its image's id **and the sha256 of its stored bytes**: an image whose content
changed, or a renamed id, is captioned again (only that image; the rest of its shard is reused), never served a
stale caption. The manifest records the captioner and the shard size; a different one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from modeling_spn4cir.atomic import atomic_write_bytes, atomic_write_json
from modeling_spn4cir.distributed import world

from .image_store import ImageStore

MANIFEST = "manifest.json"
CACHE_FORMAT = 2  # 2: records carry the image's sha256


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def captioner_key(captioner) -> str:
    """What identifies a captioner's output in the cache (class, its prompt settings and its weights' identity)."""
    names = ("prompt", "prompt_prefix", "num_words", "word_limit", "max_new_tokens", "phrases", "top_k", "column",
             "weights")
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
    manifest = {"format": CACHE_FORMAT, "shard_size": shard_size, "captioner": captioner_key(captioner)}
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
    images = ImageStore(corpus)
    mine = [i for i in range(len(shards)) if i % world_size == rank]
    # Per shard: the cached captions still valid (same id, same bytes) and the images to caption again.
    plan = {}
    for shard in mine:
        digests = dict(zip(shards[shard], images.digests(shards[shard])))
        cached = {(r.get("image_id"), r.get("sha256")): r.get("caption")
                  for r in _read_shard(cache_dir / f"captions-{shard:05d}.jsonl")}
        valid = {i: cached[(i, d)] for i, d in digests.items() if (i, d) in cached}
        if len(valid) < len(digests):
            plan[shard] = (digests, valid)
    with tqdm(total=sum(len(d) - len(v) for d, v in plan.values()), desc=f"Captioning (rank {rank})",
              disable=not show_progress_bar) as bar:
        for shard, (digests, done) in plan.items():
            todo = [i for i in shards[shard] if i not in done]
            for start in range(0, len(todo), batch_size):
                batch_ids = todo[start:start + batch_size]
                batch = corpus.select([first_row[i] for i in batch_ids]).select_columns(columns)[:]
                captions = captioner(batch)
                if len(captions) != len(batch_ids):
                    raise RuntimeError(f"The captioner returned {len(captions)} captions for {len(batch_ids)} images.")
                done.update(zip(batch_ids, captions))
                bar.update(len(batch_ids))
            lines = [json.dumps({"image_id": i, "sha256": digests[i], "caption": done[i]}) for i in shards[shard]]
            atomic_write_bytes(cache_dir / f"captions-{shard:05d}.jsonl", ("\n".join(lines) + "\n").encode())
    _barrier()
    captions, missing = {}, []
    for i, shard_ids in enumerate(shards):
        records = {r.get("image_id"): r.get("caption") for r in _read_shard(cache_dir / f"captions-{i:05d}.jsonl")}
        if any(image_id not in records for image_id in shard_ids):
            missing.append(i)
        captions.update((image_id, records.get(image_id)) for image_id in shard_ids)
    if missing:
        raise RuntimeError(
            f"Caption shards {missing[:10]} are missing or incomplete in {cache_dir} (another process has not "
            "finished or crashed); run again to resume."
        )
    return captions


def _read_shard(path: Path) -> list[dict]:
    """The records of a caption shard; none when it does not exist yet."""
    if not path.exists():
        return []
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Caption cache shard {path} is not valid JSON lines ({error}); delete it to caption its "
                         "images again.") from error
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"Caption cache shard {path} holds non-object records; delete it to caption its images "
                         "again.")
    return records
