"""Official layouts -> HF datasets: counts, fields, test splits, missing images, malformed input, path
escapes, galleries, de-duplication, pixel round trip. Fixture trees are generated here from real records."""

import csv
import fnmatch
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import (
    FIXTURES,
    build_custom_tree,
    dump_json,
    tiny_circo_layout,
    tiny_cirr_layout,
    write_pairs_csv,
    write_png,
)
from PIL import Image

from datasets_scripts.circo import build_circo
from datasets_scripts.cirr import build_cirr
from datasets_scripts.common import AnnotationError
from datasets_scripts.custom import build_custom
from datasets_scripts.dedup import canonical_map, find_duplicate_groups, pixel_hash
from datasets_scripts.dedup import main as dedup_main
from datasets_scripts.fashioniq import build_fashioniq
from datasets_scripts.image_checks import BadImageError
from datasets_scripts.publish import check_layout, push_cir_dataset
from modeling_spn4cir.storage import MARKER

REAL = json.loads((FIXTURES / "annotations" / "real_records.json").read_text())


def load(out, config, split):
    return datasets.load_dataset(str(out), config, split=split)


# ------------------------------------------------------------------------------------------ FashionIQ
@pytest.fixture
def fiq_tree(tmp_path):
    root = tmp_path / "fiq"
    val = REAL["fashioniq_dress_val"]
    test = REAL["fashioniq_dress_test"]
    dress_val = [r["candidate"] for r in val] + [r["target"] for r in val] + ["BDISTRACT1"]
    dress_test = [r["candidate"] for r in test] + ["BTEST00001"]
    trees = {
        "dress": {"train": (["BTRAIN0001", "BTRAIN0002", "BTRAIN0003"],
                            [{"candidate": "BTRAIN0001", "target": "BTRAIN0002", "captions": ["is red", "longer"]}]),
                  "val": (dress_val, val), "test": (dress_test, test)},
        # BSHARED001 is in two categories' val splits, as 121 real ASINs are
        "shirt": {"train": (["STRAIN0001", "STRAIN0002"],
                            [{"candidate": "STRAIN0002", "target": "STRAIN0001", "captions": ["blue.", "has buttons?"]}]),
                  "val": (["SVAL000001", "BSHARED001"],
                          [{"candidate": "SVAL000001", "target": "BSHARED001", "captions": ["a", "b"]}]),
                  "test": (["STEST00001"], [{"candidate": "STEST00001", "captions": ["c", "d"]}])},
        "toptee": {"train": (["TTRAIN0001", "TTRAIN0002"],
                             [{"candidate": "TTRAIN0001", "target": "TTRAIN0002", "captions": ["e", "f"]}]),
                   "val": (["TVAL000001", "BSHARED001"],
                           [{"candidate": "BSHARED001", "target": "TVAL000001", "captions": ["g", "h"]}]),
                   "test": (["TTEST00001"], [{"candidate": "TTEST00001", "captions": ["i", "j"]}])},
    }
    seed = 0
    for cat, splits in trees.items():
        for split, (asins, caps) in splits.items():
            dump_json(root / "image_splits" / f"split.{cat}.{split}.json", asins)
            dump_json(root / "captions" / f"cap.{cat}.{split}.json", caps)
            for asin in asins:
                if not (root / "images" / f"{asin}.png").exists():
                    seed += 1
                    write_png(root / "images" / f"{asin}.png", seed)
    # .jpg is accepted too
    (root / "images" / "BTRAIN0003.png").unlink()
    write_png(root / "images" / "BTRAIN0003.jpg", 999, fmt="JPEG")
    return root


def test_fashioniq_counts_fields_and_roundtrip(fiq_tree, tmp_path):
    out = build_fashioniq(fiq_tree, tmp_path / "out")
    val = load(out, "triplets", "val")
    assert len(val) == 3 + 1 + 1
    assert val.column_names == ["reference_id", "target_id", "modification_texts", "source", "category"]
    first = val[0]
    real = REAL["fashioniq_dress_val"][0]
    assert first["reference_id"] == real["candidate"] and first["target_id"] == real["target"]
    assert first["modification_texts"] == real["captions"] and first["category"] == "dress"
    assert first["source"] == "annotated"
    corpus = load(out, "corpus", "val")
    assert len(corpus) == 7 + 2 + 2 and len(set(corpus["image_id"])) == 10  # BSHARED001 once per category
    assert sorted(c for i, c in zip(corpus["image_id"], corpus["category"]) if i == "BSHARED001") == ["shirt", "toptee"]
    # pixels survive the round trip
    row = corpus[0]
    original = Image.open(fiq_tree / "images" / f"{row['image_id']}.png")
    assert np.array_equal(np.asarray(row["image"]), np.asarray(original))
    train_corpus = load(out, "corpus", "train")
    assert "BTRAIN0003" in train_corpus["image_id"] and len(train_corpus) == 7
    test = load(out, "triplets", "test")
    assert len(test) == 2 + 1 + 1 and all(t is None for t in test["target_id"])
    assert test[0]["modification_texts"] == REAL["fashioniq_dress_test"][0]["captions"]


def test_fashioniq_missing_image_error_and_skip(fiq_tree, tmp_path):
    target = REAL["fashioniq_dress_val"][1]["target"]
    (fiq_tree / "images" / f"{target}.png").unlink()
    (fiq_tree / "images" / "BDISTRACT1.png").unlink()  # a gallery-only image
    with pytest.raises(FileNotFoundError, match=r"2 images .* missing.*val:(B00AKLK08G|BDISTRACT1).*--skip_missing_images"):
        build_fashioniq(fiq_tree, tmp_path / "out", splits=["val"])
    assert not (tmp_path / "out").exists()  # nothing half-written
    out = build_fashioniq(fiq_tree, tmp_path / "out", splits=["val"], skip_missing_images=True)
    val = load(out, "triplets", "val")
    assert len(val) == 4 and target not in val["target_id"]
    assert len(load(out, "corpus", "val")) == 9
    card = (out / "README.md").read_text()
    assert "| val | 4 | 9 | 1 | 2 |" in card


def test_fashioniq_malformed_json_and_missing_field(fiq_tree, tmp_path):
    path = fiq_tree / "captions" / "cap.shirt.val.json"
    path.write_text('[{"candidate": "SVAL000001", "target": "BSHARED001", "captions": ["a", "b"]},')
    with pytest.raises(AnnotationError, match=r"cap\.shirt\.val\.json: malformed JSON"):
        build_fashioniq(fiq_tree, tmp_path / "out", splits=["val"])
    dump_json(path, [{"candidate": "SVAL000001", "target": "BSHARED001", "captions": ["a", "b"]},
                 {"candidate": "SVAL000001", "captions": ["a", "b"]}])
    with pytest.raises(AnnotationError, match=r"cap\.shirt\.val\.json: record 1 has no field 'target'"):
        build_fashioniq(fiq_tree, tmp_path / "out", splits=["val"])
    dump_json(path, [{"candidate": "NOTLISTED", "target": "BSHARED001", "captions": ["a", "b"]}])
    with pytest.raises(AnnotationError, match=r"record 0 candidate 'NOTLISTED' is not listed in split\.shirt\.val\.json"):
        build_fashioniq(fiq_tree, tmp_path / "out", splits=["val"])


# ----------------------------------------------------------------------------------------------- CIRR
@pytest.fixture
def cirr_tree(tmp_path):
    root = tmp_path / "cirr_root"
    for split, file_split in (("val", "val"), ("test1", "test1")):
        records = REAL[f"cirr_{split}"]
        paths = dict(REAL[f"cirr_{split}_paths"])
        if split == "val":
            paths["dev-999-0-img0"] = "./dev/dev-999-0-img0.png"  # in the split, in no triplet
        dump_json(root / "cirr" / "captions" / f"cap.rc2.{file_split}.json", records)
        dump_json(root / "cirr" / "image_splits" / f"split.rc2.{file_split}.json", paths)
        for i, relative in enumerate(paths.values()):
            write_png(root / relative, 100 + i + (50 if split == "test1" else 0))
    dump_json(root / "cirr" / "captions" / "cap.rc2.train.json", [
        {"pairid": 0, "reference": "train-1-0-img0", "target_hard": "train-1-0-img1", "caption": "add a dog",
         "img_set": {"id": 1, "members": ["train-1-0-img0", "train-1-0-img1"]}}])
    dump_json(root / "cirr" / "image_splits" / "split.rc2.train.json",
          {"train-1-0-img0": "./train/34/train-1-0-img0.png", "train-1-0-img1": "./train/34/train-1-0-img1.png"})
    write_png(root / "train" / "34" / "train-1-0-img0.png", 7)
    write_png(root / "train" / "34" / "train-1-0-img1.png", 8)
    return root


def test_cirr_counts_gallery_and_test(cirr_tree, tmp_path):
    out = build_cirr(cirr_tree, tmp_path / "out")
    val = load(out, "triplets", "val")
    real = REAL["cirr_val"]
    assert len(val) == len(real)
    assert val[0]["reference_id"] == real[0]["reference"] and val[0]["target_id"] == real[0]["target_hard"]
    assert val[0]["modification_texts"] == [real[0]["caption"]]
    assert val[0]["group_members"] == real[0]["img_set"]["members"] and val[0]["query_id"] == str(real[0]["pairid"])
    corpus_ids = set(load(out, "corpus", "val")["image_id"])
    assert corpus_ids == set(REAL["cirr_val_paths"]) | {"dev-999-0-img0"}
    references = set(val["reference_id"])
    assert set(val["target_id"]) - references  # targets that are never references are in the gallery
    assert set(val["target_id"]) <= corpus_ids
    test = load(out, "triplets", "test")
    assert len(test) == len(REAL["cirr_test1"]) and all(t is None for t in test["target_id"])
    assert len(load(out, "corpus", "test")) == len(REAL["cirr_test1_paths"])
    assert len(load(out, "triplets", "train")) == 1


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "./dev/../../outside.png"])
def test_cirr_path_escape_rejected(cirr_tree, tmp_path, bad):
    split = cirr_tree / "cirr" / "image_splits" / "split.rc2.val.json"
    paths = json.loads(split.read_text())
    paths["dev-999-0-img0"] = bad
    split.write_text(json.dumps(paths))
    with pytest.raises(AnnotationError, match="dev-999-0-img0.*(escapes|absolute)"):
        build_cirr(cirr_tree, tmp_path / "out", splits=["val"])


def test_cirr_missing_members_field(cirr_tree, tmp_path):
    path = cirr_tree / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(path.read_text())
    del records[2]["img_set"]["members"]
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"cap\.rc2\.val\.json: record 2 has no field 'img_set\.members'"):
        build_cirr(cirr_tree, tmp_path / "out", splits=["val"])


# ---------------------------------------------------------------------------------------------- CIRCO
def test_circo_multi_target_and_shared_gallery(tmp_path):
    root = tmp_path / "circo"
    for i, coco_id in enumerate([85932, 9761, 489535, 57541, 12, 13]):
        write_png(root / "unlabeled2017" / f"{coco_id:012d}.jpg", i, fmt="JPEG")
    dump_json(root / "annotations" / "val.json", [
        {"reference_img_id": 85932, "target_img_id": 9761, "relative_caption": "is held by a girl",
         "shared_concept": "a teddy bear", "gt_img_ids": [9761, 489535, 57541], "id": 13}])
    dump_json(root / "annotations" / "test.json", [
        {"reference_img_id": 12, "relative_caption": "is red", "shared_concept": "a car", "id": 0}])
    out = build_circo(root, tmp_path / "out")
    val = load(out, "triplets", "val")
    assert val[0]["reference_id"] == "85932" and val[0]["target_id"] == "9761"
    assert val[0]["target_ids"] == ["9761", "489535", "57541"] and val[0]["query_id"] == "13"
    test = load(out, "triplets", "test")
    assert test[0]["target_id"] is None and test[0]["target_ids"] is None
    assert load(out, "corpus", "val")["image_id"] == load(out, "corpus", "test")["image_id"]
    assert len(list((out / "corpus").glob("*.parquet"))) == 1  # stored once
    (root / "unlabeled2017" / f"{57541:012d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000057541.jpg"):
        build_circo(root, tmp_path / "out2")
    skipped = build_circo(root, tmp_path / "out2", skip_missing_images=True)
    assert "| val | 0 (split not written) | 5 | 1 | 1 |" in (skipped / "README.md").read_text()
    assert len(load(skipped, "triplets", "test")) == 1
    with pytest.raises(ValueError, match="val"):
        load(skipped, "triplets", "val")


# ------------------------------------------------------------------------------------------- custom
def test_custom_csv(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "c.png", "extra.png"]):
        write_png(tmp_path / "imgs" / name, i)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["reference", "text", "target", "split"])
        writer.writeheader()
        writer.writerow({"reference": "a", "text": "make it blue", "target": "b", "split": "train"})
        writer.writerow({"reference": "b.png", "text": "add a cat", "target": "c", "split": "val"})
        writer.writerow({"reference": "c", "text": "no target", "target": "", "split": "test"})
    out = build_custom(tmp_path / "imgs", tmp_path / "pairs.csv", tmp_path / "out", all_images_in_corpus=True)
    train = load(out, "triplets", "train")
    assert train[0] == {"reference_id": "a", "target_id": "b", "modification_texts": ["make it blue"], "source": "annotated"}
    assert load(out, "triplets", "test")[0]["target_id"] is None
    # val's "b.png" is the file train names "b": one id in every split (the first written)
    assert load(out, "triplets", "val")[0]["reference_id"] == "b"
    assert set(load(out, "corpus", "val")["image_id"]) == {"b", "c", "a.png", "extra.png"}
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("reference,text,target\na,,b\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv: record 0 has no field 'text'"):
        build_custom(tmp_path / "imgs", tmp_path / "bad.csv", tmp_path / "out2")


# -------------------------------------------------------------------------------------------- dedup
def test_dedup_groups_identical_pixels(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    other = base.copy()
    other[0, 0, 0] ^= 1  # one value differs: not a duplicate
    images = [("a", Image.fromarray(base)), ("b", Image.fromarray(other)), ("c", Image.fromarray(base).convert("RGBA")),
              ("d", Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))), ("e", Image.fromarray(base))]
    groups = find_duplicate_groups(images, show_progress_bar=False)
    assert groups == [["a", "c", "e"]]
    assert canonical_map(groups) == {"c": "a", "e": "a"}
    assert pixel_hash(Image.fromarray(base)) != pixel_hash(Image.fromarray(base[:, :4]))
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(base).save(folder / "x.png")
    Image.fromarray(base).save(folder / "y.bmp")
    Image.fromarray(other).save(folder / "z.png")
    dedup_main(["--image_dir", str(folder), "--output", str(tmp_path / "map.json")])
    assert json.loads((tmp_path / "map.json").read_text()) == {"y": "x"}


# -------------------------------------------------------------------------------------------- publish
def test_publish_uploads_the_checked_layout(cirr_tree, tmp_path):
    out = build_cirr(cirr_tree, tmp_path / "out", splits=["val"])
    assert check_layout(out) == out
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nconfigs:\n- config_name: corpus") and "path: triplets/val-" in readme

    class RecordingApi:
        calls = []

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw["repo_type"]))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message, ignore_patterns=()):
            self.calls.append(("upload_folder", folder_path, repo_id, repo_type))
            self.files = sorted(str(f.relative_to(folder_path)) for f in Path(folder_path).rglob("*") if f.is_file()
                                and not any(fnmatch.fnmatch(f.name, pattern) for pattern in ignore_patterns))

    api = RecordingApi()
    push_cir_dataset(out, "me/cirr-cir", api=api)
    assert api.calls == [("create_repo", "me/cirr-cir", "dataset"), ("upload_folder", str(out), "me/cirr-cir", "dataset")]
    # the converter's output marker stays local; the card and the data go up
    assert (out / MARKER).exists() and MARKER not in api.files and "README.md" in api.files
    assert any(f.startswith("triplets/") for f in api.files)
    assert "## License" in (out / "README.md").read_text()
    (out / "README.md").unlink()
    with pytest.raises(ValueError, match="configs"):
        check_layout(out)


def test_load_cir_data_converts_once_and_notices_changes(fiq_tree, tmp_path):
    from datasets_scripts.load import load_cir_data

    data = load_cir_data("fashioniq", str(fiq_tree), cache_dir=str(tmp_path / "cache"))
    assert data.protocol == "fashioniq" and data.join_annotated_captions
    assert len(data.triplets["val"]) == 5 and len(data.corpus["val"]) == 11
    converted = list((tmp_path / "cache").iterdir())
    assert len(converted) == 1
    again = load_cir_data("fashioniq", str(fiq_tree), cache_dir=str(tmp_path / "cache"))
    assert len(again.triplets["val"]) == 5 and list((tmp_path / "cache").iterdir()) == converted  # reused
    dump_json(fiq_tree / "captions" / "cap.shirt.val.json", [])  # the official tree changed: convert again
    changed = load_cir_data("fashioniq", str(fiq_tree), cache_dir=str(tmp_path / "cache"))
    assert len(changed.triplets["val"]) == 4 and len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(ValueError, match="--data_dir"):
        load_cir_data("cirr")


# ------------------------------------------------------- bad input: paths, images, annotations (each named)
def _fiq(root: Path, asins=("B1", "B2", "B3")) -> Path:
    """A one-category (dress) FashionIQ val split."""
    for i, asin in enumerate(asins):
        if "/" not in asin and not asin.startswith(".."):
            write_png(root / "images" / f"{asin}.png", i, size=(8, 8))
    dump_json(root / "image_splits" / "split.dress.val.json", list(asins))
    dump_json(root / "captions" / "cap.dress.val.json",
          [{"candidate": asins[0], "target": asins[1], "captions": ["is red", "is long"]}])
    return root


_circo = tiny_circo_layout


@pytest.mark.parametrize("bad", ["../../secret", "/etc/hostname", "../captions/cap.dress.val"])
def test_fashioniq_ids_must_stay_inside_the_images(tmp_path, bad):
    secret = tmp_path / "secret.png"
    write_png(secret, 9, size=(8, 8))
    root = _fiq(tmp_path / "fiq", asins=("B1", "B2", bad))
    with pytest.raises(AnnotationError, match=rf"split\.dress\.val\.json image '{bad}'.*(escapes|absolute)"):
        build_fashioniq(root, tmp_path / "out", splits=["val"], categories=["dress"])
    assert not (tmp_path / "out").exists()


def test_symlinks_leaving_the_data_dir_are_refused(tmp_path):
    outside = tmp_path / "private" / "photo.png"
    write_png(outside, 7, size=(8, 8))
    fiq = _fiq(tmp_path / "fiq")
    (fiq / "images" / "B3.png").unlink()
    (fiq / "images" / "B3.png").symlink_to(outside)
    with pytest.raises(AnnotationError, match=r"image 'B3'.*escapes .* through a symbolic link"):
        build_fashioniq(fiq, tmp_path / "o1", splits=["val"], categories=["dress"])
    circo = _circo(tmp_path / "circo")
    (circo / "unlabeled2017" / "000000000099.jpg").symlink_to(outside)
    with pytest.raises(AnnotationError, match=r"000000000099\.jpg.*escapes .* through a symbolic link"):
        build_circo(circo, tmp_path / "o2", splits=["val"])
    for name in ("c.png", "c"):  # with its extension, or found by adding one
        root = tmp_path / f"custom_{name}"
        for i, image in enumerate("ab"):
            write_png(root / "imgs" / f"{image}.png", i, size=(8, 8))
        (root / "imgs" / "c.png").symlink_to(outside)
        write_pairs_csv(root / "pairs.csv", [("a", "make it blue", name)])
        with pytest.raises(AnnotationError, match=rf"image '{name}'.*escapes"):
            build_custom_tree(root, tmp_path / f"o_{name}")
    # the layout's image folder itself may be a link (images on another disk): per-image links may not leave it
    moved = tmp_path / "disk" / "images"
    (fiq / "images" / "B3.png").unlink()
    write_png(fiq / "images" / "B3.png", 3, size=(8, 8))
    moved.parent.mkdir()
    (fiq / "images").rename(moved)
    (fiq / "images").symlink_to(moved)
    assert build_fashioniq(fiq, tmp_path / "o3", splits=["val"], categories=["dress"]).exists()


def test_corrupt_images_are_named_or_skipped_with_a_count(custom_tree, tmp_path, capsys):
    imgs = custom_tree / "imgs"
    good = (imgs / "a.png").read_bytes()
    (imgs / "trunc.png").write_bytes(good[: len(good) // 2])
    (imgs / "zero.png").write_bytes(b"")
    (imgs / "text.png").write_text("this is not an image")
    write_png(imgs / "j.jpg", 5, size=(8, 8), fmt="JPEG")
    (imgs / "tj.jpg").write_bytes((imgs / "j.jpg").read_bytes()[:200])
    (imgs / "dir.png").mkdir()
    names = ["trunc", "zero", "text", "tj", "dir"]
    write_pairs_csv(custom_tree / "pairs.csv", [("a", "make it blue", "b")] + [("a", "x", n) for n in names])
    with pytest.raises(BadImageError, match="5 image file") as error:
        build_custom_tree(custom_tree, tmp_path / "out")
    message = str(error.value)
    assert "zero.png is empty" in message and "dir.png is a directory" in message and "--skip_bad_images" in message
    for name in ("trunc.png", "text.png", "tj.jpg"):
        assert f"{name} does not decode" in message
    assert not (tmp_path / "out").exists()
    out = build_custom_tree(custom_tree, tmp_path / "out", skip_bad_images=True)
    printed = capsys.readouterr().out
    assert "5 images do not decode, left out (--skip_bad_images): dropped 5 triplets (1 kept)" in printed
    assert "'trunc'" in printed and "'dir'" in printed
    assert datasets.load_dataset(str(out), "triplets", split="train")["target_id"] == ["b"]
    assert "train: 5 (" in (out / "README.md").read_text()


def test_empty_splits_and_annotations_are_errors(custom_tree, tmp_path):
    write_pairs_csv(custom_tree / "pairs.csv", [])
    with pytest.raises(AnnotationError, match=r"pairs\.csv: no records"):
        build_custom_tree(custom_tree, tmp_path / "o1")
    cirr = tiny_cirr_layout(tmp_path / "cirr", records=[])
    with pytest.raises(AnnotationError, match=r"cap\.rc2\.val\.json: no records"):
        build_cirr(cirr, tmp_path / "o2", splits=["val"])
    fiq = _fiq(tmp_path / "fiq")
    dump_json(fiq / "captions" / "cap.dress.val.json", [])
    with pytest.raises(AnnotationError, match=r"the 'val' split is empty \(captions/cap\.\{dress\}\.val\.json"):
        build_fashioniq(fiq, tmp_path / "o3", splits=["val"], categories=["dress"])
    # every triplet dropped by an opt-in skip: still no dataset that cannot load
    write_pairs_csv(custom_tree / "pairs.csv", [("a", "make it blue", "gone")])
    with pytest.raises(ValueError, match=r"No triplets to write .* \(1 dropped for missing or bad images\)"):
        build_custom_tree(custom_tree, tmp_path / "o4", skip_missing_images=True)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_circo_ids_outside_the_gallery_or_not_numeric(tmp_path):
    record = {"id": 0, "reference_img_id": 12, "target_img_id": 99, "gt_img_ids": [13, 14], "relative_caption": "is red",
              "shared_concept": "a car"}
    root = _circo(tmp_path / "circo", val=[record])
    with pytest.raises(FileNotFoundError, match=r"val\.json: record 0 needs image 000000000099\.jpg"):
        build_circo(root, tmp_path / "out", splits=["val"])
    dump_json(root / "annotations" / "val.json", [{**record, "target_img_id": 13, "reference_img_id": "abc"}])
    with pytest.raises(AnnotationError, match=r"val\.json: record 0 field 'reference_img_id' is 'abc', expected a COCO "
                                              r"image id"):
        build_circo(root, tmp_path / "out", splits=["val"])
    dump_json(root / "annotations" / "val.json", [{**record, "target_img_id": 13, "gt_img_ids": [13, None]}])
    with pytest.raises(AnnotationError, match=r"record 0 field 'gt_img_ids' is None"):
        build_circo(root, tmp_path / "out", splits=["val"])


def test_annotation_errors_name_the_file_the_record_and_the_fix(custom_tree, tmp_path):
    # latin-1 CSV: the file, the byte and line, the fix
    write_pairs_csv(custom_tree / "pairs.csv", [("a", "café au lait", "b")], encoding="latin-1")
    with pytest.raises(AnnotationError, match=r"pairs\.csv: not valid UTF-8 \(byte \d+, line 2.*save the file as UTF-8"):
        build_custom_tree(custom_tree, tmp_path / "o")
    # a UTF-8 BOM (Excel) is accepted: the first column is 'reference', not '\ufeffreference'
    write_pairs_csv(custom_tree / "pairs.csv", [("a", "café au lait", "b")], encoding="utf-8-sig")
    assert datasets.load_dataset(str(build_custom_tree(custom_tree, tmp_path / "bom")), "triplets",
                                 split="train")["modification_texts"] == [["café au lait"]]
    # JSONL: a lone surrogate escape, a list as text, a dict as reference
    jsonl = custom_tree / "pairs.jsonl"
    for line, pattern in [
        ('{"reference": "a", "text": "bad \\udc80 text", "target": "b"}', r"record 0 field 'text' holds .*lone surrogate"),
        ('{"reference": "a", "text": ["one", "two"], "target": "b"}', r"record 0 field 'text' is a list .*one record per"),
        ('{"reference": {"id": "a"}, "text": "t", "target": "b"}', r"record 0 field 'reference' is a dict"),
    ]:
        jsonl.write_text(line + "\n")
        with pytest.raises(AnnotationError, match=rf"pairs\.jsonl: {pattern}"):
            build_custom(custom_tree / "imgs", jsonl, tmp_path / "o")
    # official JSON layouts: latin-1 bytes, a surrogate escape, a list where one id is expected
    fiq = _fiq(tmp_path / "fiq")
    (fiq / "captions" / "cap.dress.val.json").write_bytes(
        b'[{"candidate": "B1", "target": "B2", "captions": ["caf\xe9", "x"]}]')
    with pytest.raises(AnnotationError, match=r"cap\.dress\.val\.json: not valid UTF-8 \(byte 54, line 1"):
        build_fashioniq(fiq, tmp_path / "o", splits=["val"], categories=["dress"])
    cirr = tiny_cirr_layout(tmp_path / "cirr")
    path = cirr / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(path.read_text())
    path.write_text(json.dumps([{**records[0], "caption": "\udc80"}]))
    with pytest.raises(AnnotationError, match=r"cap\.rc2\.val\.json: record 0 field 'caption' holds .*lone surrogate"):
        build_cirr(cirr, tmp_path / "o", splits=["val"])
    path.write_text(json.dumps([{**records[0], "target_hard": ["dev-0-0-img1", "dev-0-0-img2"]}]))
    with pytest.raises(AnnotationError, match=r"cap\.rc2\.val\.json: record 0 field 'target_hard' is a list .*expected "
                                              r"a str"):
        build_cirr(cirr, tmp_path / "o", splits=["val"])
    assert not (tmp_path / "o").exists()


def test_dedup_map_is_cached_and_follows_changes(tmp_path):
    from datasets_scripts.dedup import dedup_map_for
    from modeling_spn4cir.image_store import ImageStore

    images = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (10, 20, 10, 30)]
    corpus = datasets.Dataset.from_dict({"image_id": ["a", "b", "c", "d"], "image": images},
                                        features=datasets.Features({"image_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    cache = tmp_path / "hashes"
    assert dedup_map_for(ImageStore(corpus), ["b", "c", "a", "d"], cache, show_progress_bar=False) == {"a": "c"}
    assert {json.loads(line)["image_id"] for shard in cache.glob("hashes-*.jsonl")
            for line in shard.read_text().splitlines()} == {"a", "b", "c", "d"}
    # a changed image is re-hashed (its stored bytes differ from the cached entry)
    changed = corpus.map(lambda r: {"image": Image.fromarray(np.full((8, 8, 3), 20, dtype=np.uint8))
                                    if r["image_id"] == "d" else r["image"]})
    assert dedup_map_for(ImageStore(changed), ["a", "b", "c", "d"], cache, show_progress_bar=False) == {
        "c": "a", "d": "b"}


def test_custom_names_of_one_file_are_one_image(custom_tree, tmp_path):
    # `a` and `a.png` (and a link to it) name one file: one id, the first written, never a copy among its negatives
    (custom_tree / "imgs" / "link.png").symlink_to(custom_tree / "imgs" / "a.png")
    write_pairs_csv(custom_tree / "pairs.csv", [("b", "make it blue", "a"), ("a.png", "add a cat", "c"),
                                                ("link.png", "and more", "b.png")])
    out = build_custom_tree(custom_tree, tmp_path / "out", all_images_in_corpus=True)
    triplets = datasets.load_dataset(str(out), "triplets", split="train")
    corpus = datasets.load_dataset(str(out), "corpus", split="train")
    assert triplets["reference_id"] == ["b", "a", "a"] and triplets["target_id"] == ["a", "c", "b"]
    assert sorted(corpus["image_id"]) == ["a", "b", "c"]  # the folder's a.png and link.png are that image too
    # a name without extension that fits two files is an error naming both
    write_png(custom_tree / "imgs" / "c.jpg", 9, size=(8, 8))
    write_pairs_csv(custom_tree / "pairs.csv", [("a", "make it blue", "c")])
    with pytest.raises(AnnotationError, match=r"'c' names 2 files under .* \(c.png, c.jpg\); write the name with its "
                                              "extension"):
        build_custom_tree(custom_tree, tmp_path / "out2")
