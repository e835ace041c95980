"""The shard store the candidate bank, the caption cache and the de-duplication hashes keep their rows in: a killed
build resumes shard by shard, a copied-in file is refused by its bytes, a stale or malformed manifest rebuilds
its shard with a reason, files of earlier builds are removed, a builder may take the still-valid rows of the
shard it replaces, the in-memory store builds one block per rank, and two processes split the shards."""

import json
import logging
import os

import pytest
import torch
from conftest import run_two_processes

from modeling_spn4cir.storage import (
    RecordsCodec,
    SafetensorsCodec,
    ShardPlan,
    ShardStore,
    fixed_size_blocks,
    one_block_per_rank,
)

ROWS = [f"r{i}" for i in range(10)]  # shard size 3: shards of 3, 3, 3 and 1 rows


class Builder:
    """Builds a shard's records `{"row", "value"}`, recording which shards it built; raises on call `fail_on`."""

    def __init__(self, value="a", fail_on=None):
        self.value, self.fail_on, self.built, self.previous = value, fail_on, [], {}

    def __call__(self, job):
        if self.fail_on is not None and len(self.built) + 1 == self.fail_on:
            raise KeyboardInterrupt("killed")
        self.built.append(job.index)
        self.previous[job.index] = job.previous()
        return [{"row": r, "value": self.value} for r in ROWS[job.plan.start:job.plan.stop]]


def _plans(store, settings="s", changed=()):
    return [ShardPlan(a, b, {"settings": settings, "shard": k, "rows": ROWS[a:b], "changed": k in changed})
            for k, (a, b) in enumerate(store.blocks(len(ROWS), 3))]


def _sync(directory, builder, **kw):
    store = ShardStore(directory, "rows", RecordsCodec(), "test store")
    plans = _plans(store, **kw)
    shards = store.sync(plans, builder, store.manifests(len(plans)), {"settings": kw.get("settings", "s")})
    return store, shards


def _records(store, shards):
    return [r for shard in shards for r in store.read(shard)]


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_killed_build_resumes_and_a_complete_store_is_reused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _sync(tmp_path, Builder(fail_on=3))
    # two complete shards, each with its manifest, and no index: the index comes last
    assert _files(tmp_path) == ["rows-00000.json", "rows-00000.jsonl", "rows-00001.json", "rows-00001.jsonl"]
    resumed = Builder()
    store, shards = _sync(tmp_path, resumed)
    assert resumed.built == [2, 3]
    assert [r["row"] for r in _records(store, shards)] == ROWS
    index = json.loads((tmp_path / "rows.json").read_text())
    assert index["fingerprint"] == {"settings": "s"} and [s["start"] for s in index["shards"]] == [0, 3, 6, 9]
    manifest = json.loads((tmp_path / "rows-00003.json").read_text())
    assert (manifest["start"], manifest["stop"], manifest["bytes"]) == (9, 10, (tmp_path / "rows-00003.jsonl").stat().st_size)
    again = Builder()
    _sync(tmp_path, again)
    assert again.built == []


def test_a_copied_in_shard_is_refused_by_its_bytes_and_a_touched_one_is_kept(tmp_path, caplog):
    _sync(tmp_path / "a", Builder("a"))
    _sync(tmp_path / "b", Builder("b"))  # same rows and fingerprints, other content, same sizes
    (tmp_path / "a" / "rows-00001.jsonl").write_bytes((tmp_path / "b" / "rows-00001.jsonl").read_bytes())
    rebuilt = Builder("a")
    with caplog.at_level(logging.WARNING):
        store, shards = _sync(tmp_path / "a", rebuilt)
    assert "rows-00001.jsonl" in caplog.text and "sha256" in caplog.text
    assert rebuilt.built == [1] and {r["value"] for r in _records(store, shards)} == {"a"}

    # same bytes, new mtime: verified by its sha256 and kept; its manifest takes the new stamp
    os.utime(tmp_path / "a" / "rows-00002.jsonl", ns=(1, 1))
    touched = Builder("a")
    _sync(tmp_path / "a", touched)
    assert touched.built == []
    assert json.loads((tmp_path / "a" / "rows-00002.json").read_text())["stat"][1] == 1


def test_stale_or_malformed_manifests_rebuild_their_shard_with_a_reason(tmp_path, caplog):
    _sync(tmp_path, Builder())
    stale = Builder()
    with caplog.at_level(logging.INFO):
        _sync(tmp_path, stale, changed={2})  # shard 2's inputs changed: only it is rebuilt
    assert stale.built == [2] and "rows-00002.jsonl was built from other inputs or settings" in caplog.text
    assert stale.previous[2] == [{"row": r, "value": "a"} for r in ROWS[6:9]]  # what it replaces, to take rows from

    (tmp_path / "rows-00000.json").write_text("{not json")
    manifest = json.loads((tmp_path / "rows-00001.json").read_text())
    (tmp_path / "rows-00001.json").write_text(json.dumps(manifest | {"stop": "x"}))
    (tmp_path / "rows.json").write_text("[1, 2")
    caplog.clear()
    broken = Builder()
    with caplog.at_level(logging.INFO):
        _sync(tmp_path, broken, changed={2})
    assert broken.built == [0, 1]
    assert "rows.json cannot be read" in caplog.text and "manifest is malformed" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _sync(tmp_path, Builder(), settings="t")
    assert "settings changed since it was built" in caplog.text


def test_files_of_earlier_builds_are_removed_and_others_kept(tmp_path):
    store = ShardStore(tmp_path, "rows", RecordsCodec(), "test store", also_remove=("rows.old",))
    longer = [ShardPlan(a, b, {"k": k}) for k, (a, b) in enumerate(fixed_size_blocks(12, 3))]
    store.sync(longer, lambda job: [{}] * (job.plan.stop - job.plan.start), store.manifests(4), {})
    for name in (".rows-00001.jsonl.1234.tmp", "rows.old", "notes.txt"):
        (tmp_path / name).write_text("x")
    shorter = longer[:2]
    store.sync(shorter, lambda job: [{}] * 3, store.manifests(2), {"n": 2})
    assert _files(tmp_path) == ["notes.txt", "rows-00000.json", "rows-00000.jsonl", "rows-00001.json",
                                "rows-00001.jsonl", "rows.json"]


def test_a_builder_must_return_one_row_per_input(tmp_path):
    store = ShardStore(tmp_path, "rows", RecordsCodec(), "test store")
    with pytest.raises(RuntimeError, match=r"test store shard 0 was built with 2 rows for its rows \[0, 3\)"):
        store.sync([ShardPlan(0, 3, {})], lambda job: [{}, {}], [None], {})


def test_tensor_shards_are_checked_and_in_memory_stores_build_one_block_per_rank(tmp_path, caplog):
    codec = SafetensorsCodec(["x"], torch.float32)
    store = ShardStore(tmp_path, "t", codec, "tensor store")
    plans = [ShardPlan(0, 2, {"k": 0})]
    store.sync(plans, lambda job: {"x": torch.ones(2, 4)}, [None], {})
    half = ShardStore(tmp_path, "t", SafetensorsCodec(["x"], torch.float16), "tensor store")
    built = []
    with caplog.at_level(logging.WARNING):
        shards = half.sync(plans, lambda job: built.append(job.index) or {"x": torch.ones(2, 4).half()},
                           half.manifests(1), {})
    assert built == [0] and "its x are F32, not float16" in caplog.text
    assert half.read(shards[0])["x"].dtype == torch.float16

    memory = ShardStore(None, "t", codec, "tensor store")
    assert memory.blocks(7, 3) == [(0, 7)]  # one process: one block, whatever the shard size
    assert one_block_per_rank(7, 2) == [(0, 3), (3, 7)] and one_block_per_rank(1, 3) == [(0, 1)]
    shards = memory.sync([ShardPlan(0, 7, {})], lambda job: {"x": torch.arange(7.0)[:, None]}, memory.manifests(1), {})
    assert shards[0].path is None and torch.equal(memory.read(shards[0])["x"][:, 0], torch.arange(7.0))


@pytest.mark.slow
def test_two_processes_split_the_shards_and_each_gets_all(tmp_path):
    out = tmp_path / "out.json"
    run_two_processes("ddp_shard_store.py", out, tmp_path / "store")
    got = json.loads(out.read_text())
    first, resumed, memory = got["first"], got["resumed"], got["memory"]
    assert first["built"] == [[0, 2, 4], [1, 3]]  # round-robin over the shards to build
    assert resumed["built"] == [[1], [3]]  # after two shards were lost: only they, one per rank
    for run in (first, resumed):
        assert run["rows"][0] == run["rows"][1] == [f"r{i}" for i in range(10)]  # every rank holds every shard
    assert memory["built"] == [[0], [1]] and memory["blocks"] == [[0, 5], [5, 10]]  # in memory: a block per rank
    assert memory["rows"][0] == memory["rows"][1] == [f"r{i}" for i in range(10)]
