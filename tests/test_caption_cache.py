"""The caption cache: split over a launcher's processes that never communicate (`RANK` / `WORLD_SIZE` set, no
process group), each process captions every W-th shard and the run is complete once every process has finished;
shards that lost their manifests keep their captions. (Resuming and never serving a stale caption:
test_positive_scaling.py; a retrained captioner: test_generative_captioner.py.)"""

import datasets
import pytest
from conftest import solid_images

from datasets_scripts.captioning import caption_corpus


def _recording(seen: list):
    """A captioner that records the ids it is asked to caption in `seen`."""
    def caption(batch):
        seen.extend(batch["image_id"])
        return [f"caption of {i}" for i in batch["image_id"]]

    return caption


def test_processes_without_a_group_take_every_other_shard(tmp_path, monkeypatch):
    ids = [f"g{i}" for i in range(10)]  # shard size 3: shards of 3, 3, 3 and 1 images
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(10)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = []
    with pytest.raises(RuntimeError, match=r"Caption shards \[1, 3\] are missing.*run again to resume"):
        caption_corpus(corpus, _recording(first), tmp_path, shard_size=3, show_progress_bar=False)
    assert first == ids[0:3] + ids[6:9]  # shards 0 and 2
    monkeypatch.setenv("RANK", "1")
    second = []
    captions = caption_corpus(corpus, _recording(second), tmp_path, shard_size=3, show_progress_bar=False)
    assert second == ids[3:6] + ids[9:10]  # shards 1 and 3, and then the whole run is complete
    assert captions == {i: f"caption of {i}" for i in ids} and (tmp_path / "captions.json").exists()


def test_shards_without_manifests_keep_their_captions(tmp_path):
    """Caption shards without their manifests (a kill between a shard and its manifest, or a cache written before
    the manifests existed): the shards are written again, but none of their captions is computed again."""
    ids = [f"g{i}" for i in range(5)]
    corpus = datasets.Dataset.from_dict({"image_id": ids, "image": solid_images(5)},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    first = caption_corpus(corpus, _recording([]), tmp_path, shard_size=2, show_progress_bar=False)
    for manifest in [*tmp_path.glob("captions-*.json"), tmp_path / "captions.json"]:
        manifest.unlink()
    again = []
    assert caption_corpus(corpus, _recording(again), tmp_path, shard_size=2, show_progress_bar=False) == first
    assert again == [] and len(list(tmp_path.glob("captions-*.json"))) == 3
