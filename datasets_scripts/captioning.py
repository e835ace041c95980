"""Caption a corpus in resumable shards, split across processes.

Captioning a real training set with an MLLM takes hours: the captions are kept in a [`ShardStore`] of JSON lines
(`captions-00000.jsonl` and its manifest `captions-00000.json`, ..., the index `captions.json`), written shard
by shard as they finish; a restarted run reuses the finished shards. Under `torch.distributed` the shards to
caption are split over the ranks; under `torchrun` / `accelerate launch` without a process group, process r takes
shards r, r + W, r + 2W, ... and the run is complete when every process has finished.

Each cached caption is keyed by its image's id **and the sha256 of its stored bytes**: an image whose content
changed, or a renamed id, is captioned again (only that image; the rest of its shard is reused), never served a
stale caption. The images' hashes are kept under their file stamps, so a warm start reads no image byte. The
cache's `manifest.json` records the captioner and the shard size; a different one is refused.

The edit writer's cache (`edit_writer.write_edits`: texts of image pairs) runs on the same machinery
(`claim_cache`, `sync_records`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from modeling_spn4cir.distributed import world
from modeling_spn4cir.image_blocks import plan_image_shards, still_valid
from modeling_spn4cir.image_store import ImageStore
from modeling_spn4cir.storage import RecordsCodec, ShardJob, ShardStore, atomic_write_json

MANIFEST = "manifest.json"
CACHE_FORMAT = 2  # 2: records carry the image's sha256


def captioner_key(captioner) -> str:
    """What identifies a captioner's output in the cache (class, its prompt settings and its weights' identity)."""
    names = ("prompt", "prompt_prefix", "num_words", "word_limit", "max_new_tokens", "phrases", "top_k", "column",
             "weights")
    fields = {k: getattr(captioner, k) for k in names if hasattr(captioner, k)}
    return json.dumps({"class": type(captioner).__name__, **fields}, sort_keys=True, default=str)


def claim_cache(cache_dir: Path, settings: dict, manifest: str = MANIFEST, what: str = "captions") -> None:
    """Refuse a cache of `what` made by another writer or shard size (its `manifest` file differs from `settings`);
    mark a new cache as this run's (rank 0)."""
    manifest_path = cache_dir / manifest
    if manifest_path.exists():
        stored = json.loads(manifest_path.read_text())
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise ValueError(
                f"{cache_dir} holds {what} of another run ({', '.join(changed)} differ); use a new cache_dir or "
                "delete this one."
            )
    elif world(from_env=True)[0] == 0:
        atomic_write_json(manifest_path, settings, indent=1)


def _captioner(corpus, captioner, ids: list[str], first_row: dict[str, int], batch_size: int, bar):
    """`build` of a caption shard: the captions still valid in the shard it replaces (same id, same bytes) are
    kept, the other images are captioned in batches."""
    columns = [c for c in corpus.column_names
               if c in ("image", "image_id", "category") or c == getattr(captioner, "column", None)]

    def caption(job: ShardJob) -> list[dict]:
        shard_ids, digests = ids[job.plan.start:job.plan.stop], job.plan.inputs["image_digests"]
        done = still_valid(job, ids, "caption")
        todo = [i for i in shard_ids if i not in done]
        for start in range(0, len(todo), batch_size):
            batch_ids = todo[start:start + batch_size]
            batch = corpus.select([first_row[i] for i in batch_ids]).select_columns(columns)[:]
            captions = captioner(batch)
            if len(captions) != len(batch_ids):
                raise RuntimeError(f"The captioner returned {len(captions)} captions for {len(batch_ids)} images.")
            done.update(zip(batch_ids, captions))
            bar.update(len(batch_ids))
        return [{"image_id": i, "sha256": d, "caption": done[i]} for i, d in zip(shard_ids, digests)]

    return caption


def caption_corpus(corpus, captioner, cache_dir: str | Path, shard_size: int = 1000, batch_size: int = 16,
                   show_progress_bar: bool = True) -> dict[str, str]:
    """`{image_id: caption}` for every image of `corpus` (first row of each id), resuming from `cache_dir`."""
    cache_dir = Path(cache_dir)
    first_row: dict[str, int] = {}
    for row, image_id in enumerate(corpus["image_id"]):
        first_row.setdefault(image_id, row)
    ids = list(first_row)
    settings = {"format": CACHE_FORMAT, "shard_size": shard_size, "captioner": captioner_key(captioner)}
    claim_cache(cache_dir, settings)
    store = ShardStore(cache_dir, "captions", RecordsCodec(), "caption cache")
    images = ImageStore(corpus)

    def plan(only):
        shards = plan_image_shards(store, images, ids, shard_size, settings, only)
        return shards.plans, shards.manifests

    with tqdm(desc=f"Captioning (rank {world(from_env=True)[0]})", unit="image", disable=not show_progress_bar) as bar:
        build = _captioner(corpus, captioner, ids, first_row, batch_size, bar)
        records = sync_records(store, len(ids), shard_size, settings, plan, build, "Caption")
    return {r["image_id"]: r["caption"] for r in records}


def sync_records(store: ShardStore, rows: int, shard_size: int, settings: dict, plan, build, label: str) -> list[dict]:
    """Every record of a cache of `rows` rows in shards of `shard_size`: `plan(only)` gives the shard plans and the
    stored manifests (`only`: the shards wanted, None for all), `build(job)` the records of a shard to build.
    Under `torch.distributed` the store splits the shards over the ranks; under a launcher without a process group
    process r builds shards r, r + W, ... and the run is complete when every process has finished (an error naming
    the `label` shards still missing otherwise)."""
    rank, world_size = world(from_env=True)
    # a launcher's processes without a process group never communicate: each takes every W-th shard
    alone = world()[1] == 1 and world_size > 1
    mine = set(range(rank, len(store.blocks(rows, shard_size)), world_size)) if alone else None
    shards = _sync(store, rows, shard_size, settings, plan, build, mine, label)
    if alone:
        shards = _sync(store, rows, shard_size, settings, plan, None, None, label)
    return [r for shard in shards for r in store.read(shard)]


def _sync(store: ShardStore, rows: int, shard_size: int, settings: dict, plan, build, only, label: str):
    """The shards `only` (all if None) held in `store`, built with `build` (None: only the finished ones of a split
    run are held, the run is complete or an error says it is not)."""
    if build is None:
        _check_complete(store, store.manifests(len(store.blocks(rows, shard_size))), label)
    plans, manifests = plan(only)
    held = store.sync(plans, build, manifests, settings)
    if only is None:
        _check_complete(store, held, label)
    return held


def _check_complete(store: ShardStore, shards: list, label: str) -> None:
    missing = [k for k, shard in enumerate(shards) if shard is None]
    if missing:
        raise RuntimeError(
            f"{label} shards {missing[:10]} are missing or incomplete in {store.directory} (another process has not "
            "finished or crashed); run again to resume."
        )
