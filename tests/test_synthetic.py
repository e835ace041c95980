"""The synthetic benchmark (`datasets_scripts.synthetic`): unique targets, hard distractors, correct modifications,
the pool and pretrain splits, determinism, and scene captions corrupted at a requested share."""

import json

import datasets
import pytest
from spn_recipe.generative_captioner import caption_phrases, caption_precision

from datasets_scripts.synthetic import MODIFICATIONS, build_synthetic, phrase_vocabulary, scene_captions


def _objects(scene_json):
    return {(o["shape"], o["colour"], o["size"], o["cell"]) for o in json.loads(scene_json)}


def _change(ref, tgt):
    """The kind of single change that turns scene `ref` into `tgt` (None if it is not exactly one change)."""
    gone, new = ref - tgt, tgt - ref
    if not gone and len(new) == 1:
        return "add"
    if len(gone) == 1 and not new:
        return "remove"
    if len(gone) == 1 and len(new) == 1:
        (s0, c0, z0, p0), (s1, c1, z1, p1) = next(iter(gone)), next(iter(new))
        diffs = [(s0 != s1, "reshape"), (c0 != c1, "recolour"), (z0 != z1, "resize"), (p0 != p1, "move")]
        changed = [name for differs, name in diffs if differs]
        return changed[0] if len(changed) == 1 else None
    return None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("syn") / "bench", seed=3, size="tiny")


def test_galleries_have_unique_targets_and_hard_distractors(bench):
    for split in ("val", "test"):
        corpus = datasets.load_dataset(str(bench), "corpus", split=split)
        triplets = datasets.load_dataset(str(bench), "triplets", split=split)
        scenes = dict(zip(corpus["image_id"], corpus["scene"]))
        keys = [frozenset(_objects(s)) for s in corpus["scene"]]
        assert len(set(keys)) == len(keys)  # every gallery scene is distinct: one correct target per query
        for row in triplets:
            target = _objects(scenes[row["target_id"]])
            matches = [i for i, k in zip(corpus["image_id"], keys) if k == frozenset(target)]
            assert matches == [row["target_id"]]
        # hard distractors: gallery scenes one attribute away from some target
        one_away = sum(
            1 for image_id, s in scenes.items()
            if any(_change(_objects(scenes[t]), _objects(s)) in ("reshape", "recolour", "resize", "move")
                   for t in triplets["target_id"]) and image_id not in triplets["target_id"]
        )
        assert one_away >= len(triplets)


def test_every_modification_is_present_and_correct(bench):
    for split in ("train", "val", "test"):
        corpus = datasets.load_dataset(str(bench), "corpus", split=split)
        scenes = dict(zip(corpus["image_id"], corpus["scene"]))
        triplets = datasets.load_dataset(str(bench), "triplets", split=split)
        assert set(triplets["modification"]) == set(MODIFICATIONS)
        for row in triplets:
            kind = _change(_objects(scenes[row["reference_id"]]), _objects(scenes[row["target_id"]]))
            assert kind == row["modification"], row
            assert row["modification_texts"][0]


def test_pool_and_pretrain_splits(bench):
    train = datasets.load_dataset(str(bench), "corpus", split="train")
    triplets = datasets.load_dataset(str(bench), "triplets", split="train")
    used = set(triplets["reference_id"]) | set(triplets["target_id"])
    assert len(set(train["image_id"]) - used) == 120  # the unlabeled pool
    pretrain = datasets.load_dataset(str(bench), "corpus", split="pretrain")
    assert len(pretrain) == 200 and all(pretrain["caption"])


def test_generator_is_deterministic(bench, tmp_path):
    again = build_synthetic(tmp_path / "again", seed=3, size="tiny")
    other = build_synthetic(tmp_path / "other", seed=4, size="tiny")
    for config in ("triplets", "corpus"):
        a = datasets.load_dataset(str(bench), config, split="test")
        b = datasets.load_dataset(str(again), config, split="test")
        c = datasets.load_dataset(str(other), config, split="test")
        if config == "corpus":
            a, b, c = (d.cast_column("image", datasets.Image(decode=False)) for d in (a, b, c))
        assert a.to_list() == b.to_list()
        assert a.to_list() != c.to_list()


def test_scene_captions_corrupt_exactly_the_requested_share_of_phrases(bench):
    pool = datasets.load_dataset(str(bench), "corpus", split="train")
    scenes = dict(zip(pool["image_id"], pool["scene"]))
    clean = scene_captions(scenes)
    assert caption_precision(list(clean.values()), list(scenes.values()))["phrase_precision"] == 100.0
    for level in (0.25, 0.5, 0.75):
        noisy = scene_captions(scenes, corrupt=level, seed=1)
        total = sum(len(caption_phrases(c)) for c in clean.values())
        wrong = sum(a != b for i in clean for a, b in zip(caption_phrases(clean[i]), caption_phrases(noisy[i])))
        assert wrong == round(level * total)  # exactly that share of phrases changed ...
        precision = caption_precision(list(noisy.values()), list(scenes.values()))
        assert abs(precision["phrase_precision"] - 100 * (1 - level)) < 100 / total + 1e-9  # ... and each is wrong
        assert all(p in phrase_vocabulary() for c in noisy.values() for p in caption_phrases(c))
        assert all(len(set(caption_phrases(c))) == len(caption_phrases(c)) for c in noisy.values())
    assert scene_captions(scenes, 0.5, seed=1) == scene_captions(scenes, 0.5, seed=1) != scene_captions(scenes, 0.5, 2)
    with pytest.raises(ValueError, match="fraction"):
        scene_captions(scenes, corrupt=1.5)
