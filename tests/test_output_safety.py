"""Output safety of every writer (converters, bank, index, training): a user's files and the input data are never
replaced, an output is overwritten only with --overwrite_output_dir and only when it is this tool's, a second
writer is locked out (a dead owner's lock is taken over), a killed run's staging is cleaned, and outputs get the
umask's permissions. Built on the custom converter (`custom_tree`, a few 8x8 images)."""

import json
import os
import subprocess
import sys

import datasets
import pytest
from conftest import build_custom_tree, tiny_cirr_layout, write_pairs_csv

from datasets_scripts.cirr import build_cirr
from datasets_scripts.custom import main as custom_main
from modeling_spn4cir.storage import (
    MARKER,
    OutputDirError,
    OutputLockedError,
    atomic_directory,
    atomic_write_bytes,
    lock_path,
    output_lock,
)


def test_user_files_and_input_data_are_never_replaced(custom_tree):
    root = custom_tree
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):  # --overwrite_output_dir never applies to someone else's files
        with pytest.raises(OutputDirError, match=r"mine is not empty and is not an output of datasets_scripts\.custom"):
            build_custom_tree(root, mine, overwrite_output_dir=overwrite)
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.tex"]
    # the data directory itself, a directory above it, and one holding the annotation file are refused too
    images = sorted(os.listdir(root / "imgs"))
    for out in (root / "imgs", root, root / "imgs" / ".."):
        with pytest.raises(OutputDirError, match="is or contains the input"):
            build_custom_tree(root, out, overwrite_output_dir=True)
    assert sorted(os.listdir(root / "imgs")) == images and (root / "pairs.csv").exists()
    # an empty directory is fine
    (root / "empty").mkdir()
    assert (build_custom_tree(root, root / "empty") / MARKER).exists()


def test_overwrite_replaces_only_a_previous_output_of_the_same_tool(custom_tree, tmp_path):
    out = build_custom_tree(custom_tree, tmp_path / "out")
    assert json.loads((out / MARKER).read_text())["tool"] == "datasets_scripts.custom"
    with pytest.raises(OutputDirError, match="already holds an output of datasets_scripts.custom; pass --overwrite_output_dir"):
        build_custom_tree(custom_tree, out)
    write_pairs_csv(custom_tree / "pairs.csv", [("c", "now a single triplet", "a")])
    custom_main(["--data_dir", str(custom_tree / "imgs"), "--annotations", str(custom_tree / "pairs.csv"),
                 "--output_dir", str(out), "--overwrite_output_dir"])
    assert datasets.load_dataset(str(out), "triplets", split="train")["reference_id"] == ["c"]
    # an output of another tool is not "ours": refused even with overwrite
    tiny_cirr_layout(tmp_path / "cirr")
    with pytest.raises(OutputDirError, match="holds an output of datasets_scripts.custom, not of datasets_scripts.cirr"):
        build_cirr(tmp_path / "cirr", out, splits=["val"], overwrite_output_dir=True)
    assert datasets.load_dataset(str(out), "triplets", split="train")["reference_id"] == ["c"]


def test_lock_refuses_a_second_writer_and_a_dead_owner_is_taken_over(custom_tree, tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, tool="datasets_scripts.custom"):  # a writer in progress (same rules, same lock)
        with pytest.raises(OutputLockedError, match=rf"out is being written by another process \(pid {os.getpid()} "
                                                    r".*If that process is no longer running, delete"):
            build_custom_tree(custom_tree, out, overwrite_output_dir=True)
    # a lock file left by a process that died (SIGKILL) does not block the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(json.dumps({"pid": int(dead.stdout), "host": "here"}))
    assert datasets.load_dataset(str(build_custom_tree(custom_tree, out, overwrite_output_dir=True)), "triplets", split="train")
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
    build_custom_tree(custom_tree, tmp_path / "out")
    assert not any(p.exists() for p in leftovers)
    assert all((p / "part.parquet").exists() for p in others)  # another output's staging, user dirs: untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.v2", ".outer.staging-0123456789ab"]


def test_outputs_get_the_usual_permissions(custom_tree, tmp_path):
    old = os.umask(0o027)
    try:
        out = build_custom_tree(custom_tree, tmp_path / "out")
        written = atomic_write_bytes(tmp_path / "results.json", b"{}")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750  # 0777 minus the umask, not mkdtemp's 0700
    assert (out / "README.md").stat().st_mode & 0o777 == 0o640
    assert all(p.stat().st_mode & 0o777 == 0o750 for p in out.rglob("*") if p.is_dir())
    assert written.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


def test_an_output_file_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    """The one output-file rule (`write_output_file`): what `retrieve.py --json/--html` and the retrieval report
    write by."""
    from modeling_spn4cir.storage import OutputFileError, write_output_file

    signature = b'"format": "test-results/1"'
    ours = b'{"format": "test-results/1", "n": 1}'
    out = write_output_file(tmp_path / "hits.json", ours, signature, "results file")
    assert write_output_file(out, ours.replace(b"1}", b"2}"), signature, "results file").read_bytes().endswith(b"2}")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG precious")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "link.json").symlink_to(out)
    marked = tmp_path / "idx"
    marked.mkdir()
    (marked / MARKER).write_text(json.dumps({"tool": "CIRIndex"}))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    refusals = {tmp_path / "photo.png": "exists and is not a results file written by spn4cir",
                tmp_path / "dir.json": "is a directory", tmp_path / "link.json": "is a symbolic link",
                marked / "new.json": "lies inside .*idx, an output of CIRIndex that is written as a whole",
                inputs / "new.json": "is, or lies inside, an input of this run"}
    for path, why in refusals.items():
        with pytest.raises(OutputFileError, match=why):
            write_output_file(path, ours, signature, "results file", protect=[inputs])
    assert (tmp_path / "photo.png").read_bytes() == b"\x89PNG precious" and not (marked / "new.json").exists()
    with pytest.raises(ValueError, match="does not carry its signature"):
        write_output_file(tmp_path / "other.json", b"{}", signature, "results file")


def test_retrieval_writers_never_overwrite_an_input_an_index_or_any_other_file(tiny_model_dir, image_dir, tmp_path):
    """`retrieve.py search --json/--html` refuses (before any work) the index's files, a gallery image, the reference
    image and the model's files, and the retrieval report refuses a report folder holding other files."""
    import retrieve

    from modeling_spn4cir.retrieval.report import HTML_SIGNATURE, write_report
    from modeling_spn4cir.storage import OutputFileError

    index = tmp_path / "idx"
    build = ["index", "--model", str(tiny_model_dir), "--images", str(image_dir), "--output", str(index)]
    partial = tmp_path / "idx.partial"  # where the build keeps its resumable shards, deleted at the end
    partial.mkdir()
    (partial / "holiday.jpg").write_bytes(b"someone's photo")
    with pytest.raises(FileExistsError, match=r"idx.partial holds files that are not an index build's "
                                              r"\(\['holiday.jpg'\]\)"):
        retrieve.main(build)
    (partial / "holiday.jpg").unlink()
    retrieve.main(build)
    assert not partial.exists()
    with pytest.raises(OutputDirError, match="already holds an output of CIRIndex; pass --overwrite_output_dir"):
        retrieve.main(build)  # refused before the model is loaded or an image encoded
    reference = image_dir / "im03.png"
    targets = [index / "index.json", index / "embeddings-00000.safetensors", image_dir / "im01.png", reference,
               tiny_model_dir / "config.json", tmp_path / "notes.txt"]
    (tmp_path / "notes.txt").write_text("mine")
    before = {path: path.read_bytes() for path in targets}
    search = ["search", "--index", str(index), "--reference", str(reference), "--text", "make it blue"]
    for path in targets:
        for option in ("--json", "--html"):
            with pytest.raises(OutputFileError, match=str(path)):
                retrieve.main([*search, option, str(path)])
    assert all(path.read_bytes() == data for path, data in before.items())
    retrieve.main([*search, "--json", str(tmp_path / "hits.json"), "--html", str(tmp_path / "hits.html")])
    retrieve.main([*search, "--json", str(tmp_path / "hits.json"), "--html", str(tmp_path / "hits.html")])  # again
    with pytest.raises(OutputFileError, match="hits.json exists and is not a retrieval page"):
        retrieve.main([*search, "--html", str(tmp_path / "hits.json")])
    with pytest.raises(SystemExit, match="--json and --html are both"):
        retrieve.main([*search, "--json", str(tmp_path / "x"), "--html", str(tmp_path / "x")])
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "retrieval_report.png").write_bytes(b"a user's picture")
    with pytest.raises(OutputFileError, match="retrieval_report.png exists and is not a retrieval report sheet"):
        write_report(report_dir, [], "t")
    assert (report_dir / "retrieval_report.png").read_bytes() == b"a user's picture"
    (report_dir / "retrieval_report.png").unlink()
    assert set(write_report(report_dir, [], "t")) == {"html", "png"} and write_report(report_dir, [], "t")
    # a report of an earlier version (no generator tag, an untagged sheet beside it) is still recognized as one
    page = (report_dir / "retrieval_report.html").read_text()
    (report_dir / "retrieval_report.html").write_text(page.replace(HTML_SIGNATURE[0].decode(), ""))
    (report_dir / "retrieval_report.png").write_bytes(b"\x89PNG\r\n\x1a\n an old sheet")
    assert HTML_SIGNATURE[0] in write_report(report_dir, [], "t")["html"].read_bytes()
def test_model_weights_and_index_embeddings_get_the_umask_permissions(tiny_model_dir, image_dir, tmp_path):
    """safetensors' `save_file` (behind every `save_pretrained`) leaves `model.safetensors` 0600 beside 0644
    siblings; every writer of a model directory gives it the umask's permissions, as the index's files have."""
    from modeling_spn4cir.conversion_utils import write_converted
    from modeling_spn4cir.loading import load_cir_model_and_processor
    from modeling_spn4cir.retrieval import CIRIndex
    from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

    model, processor = load_cir_model_and_processor(str(tiny_model_dir))
    old = os.umask(0o022)
    try:
        args = CIRTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
        CIRTrainer(model, args, processor=processor).save_model()
        write_converted(model, processor, "card", tmp_path / "converted")
        CIRIndex.build(model, processor.image_processor, image_dir, show_progress_bar=False).save(tmp_path / "idx")
    finally:
        os.umask(old)
    for out in ("run", "converted", "idx"):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / out).iterdir() if p.is_file()}
        assert set(modes.values()) == {"0o644"}, (out, modes)
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "converted" / "model.safetensors").exists()
