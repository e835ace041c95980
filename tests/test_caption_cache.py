"""The caption cache split over a launcher's processes that never communicate (`RANK` / `WORLD_SIZE` set, no
process group): each process captions every W-th shard, and the run is complete once every process has finished."""

import datasets
import pytest
from conftest import solid_images

from datasets_scripts.captioning import caption_corpus


class _Recording:
    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        self.seen += batch["image_id"]
        return [f"caption of {i}" for i in batch["image_id"]]


def test_processes_without_a_group_take_every_other_shard(tmp_path, monkeypatch):
    ids = [f"g{i}" for i in range(10)]  # shard size 3: shards of 3, 3, 3 and 1 images
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(10)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = _Recording()
    with pytest.raises(RuntimeError, match=r"Caption shards \[1, 3\] are missing.*run again to resume"):
        caption_corpus(corpus, first, tmp_path, shard_size=3, show_progress_bar=False)
    assert first.seen == ids[0:3] + ids[6:9]  # shards 0 and 2
    monkeypatch.setenv("RANK", "1")
    second = _Recording()
    captions = caption_corpus(corpus, second, tmp_path, shard_size=3, show_progress_bar=False)
    assert second.seen == ids[3:6] + ids[9:10]  # shards 1 and 3, and then the whole run is complete
    assert captions == {i: f"caption of {i}" for i in ids} and (tmp_path / "captions.json").exists()
