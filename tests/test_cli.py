"""How the command lines end on an error (`modeling_spn4cir.cli.run_cli`): the library's own errors as one message
naming the fix and exit status 1, the traceback only with `--debug`; every CLI goes through it and lists `--debug`;
and the errors that used to mislead (a missing `--reference`, a moved model directory, `demo.py --model` without
`--index`) name the real cause."""

import argparse
import ast
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from modeling_spn4cir.cli import error_message, run_cli, take_debug_flag

ROOT = Path(__file__).resolve().parents[1]


def _run(main, argv, capsys) -> str:
    """`run_cli(main, argv)`: it must exit with status 1; returns what it printed on stderr."""
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_library_error_is_one_message_and_debug_shows_the_traceback(capsys):
    import run_cir

    argv = ["--dataset", "somewhere", "--model_name_or_path", "some/model"]
    err = _run(run_cir.main, argv, capsys)
    assert err.startswith(f"{Path(sys.argv[0]).name}: error: Nothing to do: pass --do_train")
    assert "--do_eval" in err and "--debug" in err.splitlines()[-1]
    with pytest.raises(ValueError, match="Nothing to do"):  # --debug: the error itself, with its traceback
        run_cli(run_cir.main, [*argv, "--debug"])


def test_only_the_projects_errors_and_oserrors_become_messages(capsys, tmp_path):
    def bug():
        raise TypeError("a bug of ours: keep the traceback")

    def third_party():
        json.loads("{")  # a ValueError raised inside the json module, not by the project

    def missing_file():
        (tmp_path / "absent.json").read_text()  # an OSError: a matter of the environment, wherever raised

    with pytest.raises(TypeError):
        run_cli(lambda argv: bug(), [])
    with pytest.raises(json.JSONDecodeError):
        run_cli(lambda argv: third_party(), [])
    assert "absent.json" in _run(lambda argv: missing_file(), [], capsys)


def test_a_clis_own_exit_message_reads_like_the_other_errors(capsys):
    def refuse(argv):
        raise SystemExit("Pass --reference IMAGE or --reference_id GALLERY_ID, not both.")

    def parse(argv):
        parser = argparse.ArgumentParser(prog="tool")
        parser.add_argument("--n", type=int)
        return parser.parse_args(argv)

    err = _run(refuse, [], capsys)
    assert err == f"{Path(sys.argv[0]).name}: error: Pass --reference IMAGE or --reference_id GALLERY_ID, not both.\n"
    with pytest.raises(SystemExit) as stop:  # argparse's own errors keep their status (2) and single message
        run_cli(parse, ["--n", "x"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("error:") == 1
    with pytest.raises(SystemExit) as stop:  # --help still exits 0
        run_cli(parse, ["--help"])
    assert stop.value.code == 0


def test_debug_flag_is_taken_off_but_training_arguments_debug_is_left():
    assert take_debug_flag(["--x", "1", "--debug"]) == (True, ["--x", "1"])
    assert take_debug_flag(["--debug", "--x"]) == (True, ["--x"])
    # TrainingArguments has a --debug of its own, which takes a value
    assert take_debug_flag(["--debug", "underflow_overflow"]) == (False, ["--debug", "underflow_overflow"])
    assert error_message(KeyError("image 'a' is not in the corpus")) == "image 'a' is not in the corpus"


def _cli_modules() -> list[Path]:
    """Every module of the packages and the examples that runs as a command line."""
    found = []
    for layer in ("modeling_spn4cir", "datasets_scripts", "trainers", "examples"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                found.append(path)
    return found


def test_every_cli_ends_through_run_cli():
    bad = []
    for path in _cli_modules():
        for node in ast.parse(path.read_text()).body:
            main_block = isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
            if main_block and ast.unparse(node.body[-1]).strip() != "run_cli(main)":
                bad.append(f"{path.relative_to(ROOT)}: {ast.unparse(node.body[-1])}")
    assert len(_cli_modules()) >= 18 and not bad, bad


def test_no_cli_help_joins_a_shell_continuation_line():
    """A command in a CLI's docstring (its --help) continued with a backslash keeps the backslash and the line break:
    in a plain (not raw) string an odd run of backslashes before the newline joins the two lines into one."""
    joined = []
    for path in _cli_modules():
        text = path.read_text()
        module = ast.parse(text)
        doc = module.body[0] if module.body and isinstance(module.body[0], ast.Expr) else None
        if doc is None or not isinstance(doc.value, ast.Constant) or not isinstance(doc.value.value, str):
            continue
        source = ast.get_source_segment(text, doc)
        if source[:1] in "rR":  # a raw string keeps every backslash
            continue
        joined += [f"{path.relative_to(ROOT)}: {line.strip()}" for line in source.splitlines()
                   if (len(line) - len(line.rstrip("\\"))) % 2 == 1]
    assert not joined, joined


HELP = [("generate_triplets", []), ("retrieve", ["search"]), ("retrieve", ["index"]), ("demo", []),
        ("convert_paper_checkpoints", []), ("datasets_scripts.cirr", []), ("datasets_scripts.circo", []),
        ("datasets_scripts.fashioniq", []), ("datasets_scripts.custom", []), ("datasets_scripts.images", []),
        ("datasets_scripts.synthetic", []), ("datasets_scripts.dedup", []), ("datasets_scripts.publish", []),
        ("modeling_spn4cir.convert_original_checkpoint", ["--family", "sprc"]),
        ("modeling_spn4cir.clip4cir.convert_clip4cir_original_checkpoint", []),
        ("spn_recipe.generative_captioner", []), ("run_cir", [])]


@pytest.mark.parametrize(("module", "argv"), HELP, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_cli_lists_debug_in_its_help(module, argv, capsys):
    try:
        importlib.import_module(module).main([*argv, "--help"])
    except SystemExit as stop:
        assert stop.code == 0
    assert "--debug" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the errors that used to mislead
def test_retrieve_names_a_missing_reference_and_a_moved_model(tiny_model_dir, image_dir, tmp_path, capsys):
    import retrieve

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    retrieve.main(["index", "--model", str(model_dir), "--images", str(image_dir), "--output", str(tmp_path / "idx")])
    search = ["search", "--index", str(tmp_path / "idx"), "--text", "make it blue"]
    # was transformers' "Incorrect image source ... Incorrect padding"
    err = _run(retrieve.main, [*search, "--reference", str(tmp_path / "query.jpg")], capsys)
    assert f"--reference {tmp_path / 'query.jpg'}: no such image file" in err
    model_dir.rename(tmp_path / "moved")
    # was huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    err = _run(retrieve.main, search, capsys)
    assert f"built by the model at {model_dir}, which does not exist" in err and "pass --model" in err
    hits = retrieve.main([*search, "--model", str(tmp_path / "moved")])  # the fix it names works
    assert len(hits) == 10


def test_a_model_path_that_exists_nowhere_is_named(tiny_cir_dataset, tmp_path, capsys):
    import run_cir

    missing = tmp_path / "gone" / "stage1"
    err = _run(run_cir.main, ["--dataset", str(tiny_cir_dataset), "--model_name_or_path", str(missing), "--do_eval",
                              "--output_dir", str(tmp_path / "out")], capsys)
    assert f"{missing} does not exist (no such directory, and not a Hub model id)" in err


def test_demo_model_without_index_says_what_to_pass(tiny_model_dir, tmp_path, capsys):
    import demo

    # was FileNotFoundError: outputs/spn_recipe/benchmark
    err = _run(demo.main, ["--model", str(tiny_model_dir), "--recipe_dir", str(tmp_path / "no_recipe")], capsys)
    assert "without --index searches the built-in recipe's test gallery" in err
    assert f"retrieve.py index --model {tiny_model_dir}" in err and "Pass --index INDEX" in err


def test_dedup_of_a_folder_that_does_not_exist_is_an_error(tmp_path, capsys):
    from datasets_scripts import dedup

    # was "0 groups of identical images", as if the folder held no copies
    assert f"--image_dir {tmp_path / 'nope'} is not a folder" in _run(dedup.main, ["--image_dir",
                                                                                   str(tmp_path / "nope")], capsys)
