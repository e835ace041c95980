"""Reliability of the dataset/model writers and the annotation readers (issue 20, part A): a user's files are
never deleted, outputs are locked, leftovers cleaned and readable by others; paths stay inside the data
directory; corrupt images, empty splits and malformed records are errors naming the culprit. Fixture trees are
built here (a few 8x8 images each)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from datasets_scripts.circo import build_circo
from datasets_scripts.cirr import build_cirr
from datasets_scripts.common import AnnotationError
from datasets_scripts.custom import build_custom
from datasets_scripts.custom import main as custom_main
from datasets_scripts.fashioniq import build_fashioniq
from datasets_scripts.image_checks import BadImageError
from modeling_spn4cir.storage import (
    MARKER,
    OutputDirError,
    OutputLockedError,
    atomic_directory,
    atomic_write_bytes,
    lock_path,
    output_lock,
)


def _image(path: Path, seed: int, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _dump(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def custom_tree(tmp_path):
    """imgs/{a,b,c}.png and pairs.csv (two train triplets)."""
    for i, name in enumerate("abc"):
        _image(tmp_path / "imgs" / f"{name}.png", i)
    _write_csv(tmp_path / "pairs.csv", [("a", "make it blue", "b"), ("b", "add a cat", "c")])
    return tmp_path


def _write_csv(path: Path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(["reference", "text", "target"])
        writer.writerows(rows)


def _custom(root: Path, out: Path, **kw):
    return build_custom(root / "imgs", root / "pairs.csv", out, **kw)


def _fiq(root: Path, asins=("B1", "B2", "B3")) -> Path:
    """A one-category (dress) FashionIQ val split."""
    for i, asin in enumerate(asins):
        if "/" not in asin and not asin.startswith(".."):
            _image(root / "images" / f"{asin}.png", i)
    _dump(root / "image_splits" / "split.dress.val.json", list(asins))
    _dump(root / "captions" / "cap.dress.val.json",
          [{"candidate": asins[0], "target": asins[1], "captions": ["is red", "is long"]}])
    return root


def _cirr(root: Path, records=None) -> Path:
    paths = {f"dev-0-0-img{i}": f"./dev/dev-0-0-img{i}.png" for i in range(3)}
    for i, relative in enumerate(paths.values()):
        _image(root / relative, i)
    _dump(root / "cirr" / "image_splits" / "split.rc2.val.json", paths)
    _dump(root / "cirr" / "captions" / "cap.rc2.val.json", records if records is not None else [
        {"pairid": 0, "reference": "dev-0-0-img0", "target_hard": "dev-0-0-img1", "caption": "add a dog",
         "img_set": {"id": 0, "members": list(paths)}}])
    return root


def _circo(root: Path, val=None) -> Path:
    for i, coco_id in enumerate((12, 13, 14)):
        _image(root / "unlabeled2017" / f"{coco_id:012d}.jpg", i, fmt="JPEG")
    _dump(root / "annotations" / "val.json", val if val is not None else [
        {"id": 0, "reference_img_id": 12, "target_img_id": 13, "gt_img_ids": [13, 14], "relative_caption": "is red",
         "shared_concept": "a car"}])
    return root


# ------------------------------------------------------------------------------------------- data loss
def test_user_files_and_input_data_are_never_replaced(custom_tree):
    root = custom_tree
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):  # --overwrite_output_dir never applies to someone else's files
        with pytest.raises(OutputDirError, match=r"mine is not empty and is not an output of datasets_scripts\.custom"):
            _custom(root, mine, overwrite_output_dir=overwrite)
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.tex"]
    # the data directory itself, a directory above it, and one holding the annotation file are refused too
    images = sorted(os.listdir(root / "imgs"))
    for out in (root / "imgs", root, root / "imgs" / ".."):
        with pytest.raises(OutputDirError, match="is or contains the input"):
            _custom(root, out, overwrite_output_dir=True)
    assert sorted(os.listdir(root / "imgs")) == images and (root / "pairs.csv").exists()
    # an empty directory is fine
    (root / "empty").mkdir()
    assert (_custom(root, root / "empty") / MARKER).exists()


def test_overwrite_replaces_only_a_previous_output_of_the_same_tool(custom_tree, tmp_path):
    out = _custom(custom_tree, tmp_path / "out")
    assert json.loads((out / MARKER).read_text())["tool"] == "datasets_scripts.custom"
    with pytest.raises(OutputDirError, match="already holds an output of datasets_scripts.custom; pass --overwrite_output_dir"):
        _custom(custom_tree, out)
    _write_csv(custom_tree / "pairs.csv", [("c", "now a single triplet", "a")])
    custom_main(["--data_dir", str(custom_tree / "imgs"), "--annotations", str(custom_tree / "pairs.csv"),
                 "--output_dir", str(out), "--overwrite_output_dir"])
    assert datasets.load_dataset(str(out), "triplets", split="train")["reference_id"] == ["c"]
    # an output of another tool is not "ours": refused even with overwrite
    _cirr(tmp_path / "cirr")
    with pytest.raises(OutputDirError, match="holds an output of datasets_scripts.custom, not of datasets_scripts.cirr"):
        build_cirr(tmp_path / "cirr", out, splits=["val"], overwrite_output_dir=True)
    assert datasets.load_dataset(str(out), "triplets", split="train")["reference_id"] == ["c"]


def test_lock_refuses_a_second_writer_and_a_dead_owner_is_taken_over(custom_tree, tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, tool="datasets_scripts.custom"):  # a writer in progress (same rules, same lock)
        with pytest.raises(OutputLockedError, match=rf"out is being written by another process \(pid {os.getpid()} "
                                                    r".*If that process is no longer running, delete"):
            _custom(custom_tree, out, overwrite_output_dir=True)
    # a lock file left by a process that died (SIGKILL) does not block the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(json.dumps({"pid": int(dead.stdout), "host": "here"}))
    assert datasets.load_dataset(str(_custom(custom_tree, out, overwrite_output_dir=True)), "triplets", split="train")
    assert not lock_path(out).exists()
    with output_lock(out):  # and the lock is free again
        pass


def test_staging_left_by_a_killed_run_is_cleaned(custom_tree, tmp_path):
    leftovers = [tmp_path / ".out.staging-0123456789ab", tmp_path / ".out.old-0123456789ab",
                 tmp_path / ".out.k2j_x9ab"]  # the last: mkdtemp's name in earlier versions
    others = [tmp_path / ".outer.staging-0123456789ab", tmp_path / ".out.v2", tmp_path / "out.keep"]
    for directory in leftovers + others:
        directory.mkdir()
        (directory / "part.parquet").write_bytes(b"x" * 10)
    _custom(custom_tree, tmp_path / "out")
    assert not any(p.exists() for p in leftovers)
    assert all((p / "part.parquet").exists() for p in others)  # another output's staging, user dirs: untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.v2", ".outer.staging-0123456789ab"]


def test_outputs_get_the_usual_permissions(custom_tree, tmp_path):
    old = os.umask(0o027)
    try:
        out = _custom(custom_tree, tmp_path / "out")
        written = atomic_write_bytes(tmp_path / "results.json", b"{}")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750  # 0777 minus the umask, not mkdtemp's 0700
    assert (out / "README.md").stat().st_mode & 0o777 == 0o640
    assert all(p.stat().st_mode & 0o777 == 0o750 for p in out.rglob("*") if p.is_dir())
    assert written.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


# ------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("bad", ["../../secret", "/etc/hostname", "../captions/cap.dress.val"])
def test_fashioniq_ids_must_stay_inside_the_images(tmp_path, bad):
    secret = tmp_path / "secret.png"
    _image(secret, 9)
    root = _fiq(tmp_path / "fiq", asins=("B1", "B2", bad))
    with pytest.raises(AnnotationError, match=rf"split\.dress\.val\.json image '{bad}'.*(escapes|absolute)"):
        build_fashioniq(root, tmp_path / "out", splits=["val"], categories=["dress"])
    assert not (tmp_path / "out").exists()


def test_symlinks_leaving_the_data_dir_are_refused(tmp_path):
    outside = tmp_path / "private" / "photo.png"
    _image(outside, 7)
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
            _image(root / "imgs" / f"{image}.png", i)
        (root / "imgs" / "c.png").symlink_to(outside)
        _write_csv(root / "pairs.csv", [("a", "make it blue", name)])
        with pytest.raises(AnnotationError, match=rf"image '{name}'.*escapes"):
            _custom(root, tmp_path / f"o_{name}")
    # the layout's image folder itself may be a link (images on another disk): per-image links may not leave it
    moved = tmp_path / "disk" / "images"
    (fiq / "images" / "B3.png").unlink()
    _image(fiq / "images" / "B3.png", 3)
    moved.parent.mkdir()
    (fiq / "images").rename(moved)
    (fiq / "images").symlink_to(moved)
    assert build_fashioniq(fiq, tmp_path / "o3", splits=["val"], categories=["dress"]).exists()


# ------------------------------------------------------------------------------------------- bad data
def test_corrupt_images_are_named_or_skipped_with_a_count(custom_tree, tmp_path, capsys):
    imgs = custom_tree / "imgs"
    good = (imgs / "a.png").read_bytes()
    (imgs / "trunc.png").write_bytes(good[: len(good) // 2])
    (imgs / "zero.png").write_bytes(b"")
    (imgs / "text.png").write_text("this is not an image")
    _image(imgs / "j.jpg", 5, fmt="JPEG")
    (imgs / "tj.jpg").write_bytes((imgs / "j.jpg").read_bytes()[:200])
    (imgs / "dir.png").mkdir()
    names = ["trunc", "zero", "text", "tj", "dir"]
    _write_csv(custom_tree / "pairs.csv", [("a", "make it blue", "b")] + [("a", "x", n) for n in names])
    with pytest.raises(BadImageError, match="5 image file") as error:
        _custom(custom_tree, tmp_path / "out")
    message = str(error.value)
    assert "zero.png is empty" in message and "dir.png is a directory" in message and "--skip_bad_images" in message
    for name in ("trunc.png", "text.png", "tj.jpg"):
        assert f"{name} does not decode" in message
    assert not (tmp_path / "out").exists()
    out = _custom(custom_tree, tmp_path / "out", skip_bad_images=True)
    printed = capsys.readouterr().out
    assert "5 images do not decode, left out (--skip_bad_images): dropped 5 triplets (1 kept)" in printed
    assert "'trunc'" in printed and "'dir'" in printed
    assert datasets.load_dataset(str(out), "triplets", split="train")["target_id"] == ["b"]
    assert "train: 5 (" in (out / "README.md").read_text()


def test_empty_splits_and_annotations_are_errors(custom_tree, tmp_path):
    _write_csv(custom_tree / "pairs.csv", [])
    with pytest.raises(AnnotationError, match=r"pairs\.csv: no records"):
        _custom(custom_tree, tmp_path / "o1")
    cirr = _cirr(tmp_path / "cirr", records=[])
    with pytest.raises(AnnotationError, match=r"cap\.rc2\.val\.json: no records"):
        build_cirr(cirr, tmp_path / "o2", splits=["val"])
    fiq = _fiq(tmp_path / "fiq")
    _dump(fiq / "captions" / "cap.dress.val.json", [])
    with pytest.raises(AnnotationError, match=r"the 'val' split is empty \(captions/cap\.\{dress\}\.val\.json"):
        build_fashioniq(fiq, tmp_path / "o3", splits=["val"], categories=["dress"])
    # every triplet dropped by an opt-in skip: still no dataset that cannot load
    _write_csv(custom_tree / "pairs.csv", [("a", "make it blue", "gone")])
    with pytest.raises(ValueError, match=r"No triplets to write .* \(1 dropped for missing or bad images\)"):
        _custom(custom_tree, tmp_path / "o4", skip_missing_images=True)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_circo_ids_outside_the_gallery_or_not_numeric(tmp_path):
    record = {"id": 0, "reference_img_id": 12, "target_img_id": 99, "gt_img_ids": [13, 14], "relative_caption": "is red",
              "shared_concept": "a car"}
    root = _circo(tmp_path / "circo", val=[record])
    with pytest.raises(FileNotFoundError, match=r"val\.json: record 0 needs image 000000000099\.jpg"):
        build_circo(root, tmp_path / "out", splits=["val"])
    _dump(root / "annotations" / "val.json", [{**record, "target_img_id": 13, "reference_img_id": "abc"}])
    with pytest.raises(AnnotationError, match=r"val\.json: record 0 field 'reference_img_id' is 'abc', expected a COCO "
                                              r"image id"):
        build_circo(root, tmp_path / "out", splits=["val"])
    _dump(root / "annotations" / "val.json", [{**record, "target_img_id": 13, "gt_img_ids": [13, None]}])
    with pytest.raises(AnnotationError, match=r"record 0 field 'gt_img_ids' is None"):
        build_circo(root, tmp_path / "out", splits=["val"])


# ------------------------------------------------------------------------------------------- errors naming the culprit
def test_annotation_errors_name_the_file_the_record_and_the_fix(custom_tree, tmp_path):
    # latin-1 CSV: the file, the byte and line, the fix
    _write_csv(custom_tree / "pairs.csv", [("a", "café au lait", "b")], encoding="latin-1")
    with pytest.raises(AnnotationError, match=r"pairs\.csv: not valid UTF-8 \(byte \d+, line 2.*save the file as UTF-8"):
        _custom(custom_tree, tmp_path / "o")
    # a UTF-8 BOM (Excel) is accepted: the first column is 'reference', not '\ufeffreference'
    _write_csv(custom_tree / "pairs.csv", [("a", "café au lait", "b")], encoding="utf-8-sig")
    assert datasets.load_dataset(str(_custom(custom_tree, tmp_path / "bom")), "triplets",
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
    cirr = _cirr(tmp_path / "cirr")
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
