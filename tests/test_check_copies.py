"""The shipped shared file (`modeling_spn4cir/cir_contract.py`) is copied into every family folder, and
`utils/check_copies.py` keeps the copies identical to it."""

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check_copies():
    spec = importlib.util.spec_from_file_location("check_copies", ROOT / "utils" / "check_copies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_family_folder_holds_an_identical_copy():
    check_copies = _check_copies()
    copies = check_copies.copy_paths()
    assert {p.parent.name for p in copies} >= {"clip4cir", "tgcir", "blip4cir", "sprc"}
    assert check_copies.stale_copies() == [], "run `python utils/check_copies.py --fix`"
    original = (ROOT / "modeling_spn4cir" / "cir_contract.py").read_text()
    for path in copies:
        header, body = path.read_text().split("\n", 1)
        assert "Copied from modeling_spn4cir/cir_contract.py" in header and "--fix" in header and body == original


def test_a_stale_copy_is_found_and_fixed(tmp_path):
    check_copies = _check_copies()
    package = tmp_path / "modeling_spn4cir"
    for folder in ("alpha", "beta", "storage"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    for family in ("alpha", "beta"):  # a family folder ships a modeling file; storage/ is a plain subpackage
        (package / family / f"modeling_{family}.py").write_text("")
    (package / "cir_contract.py").write_text("VALUE = 1\n")
    (package / "alpha" / "cir_contract.py").write_text(check_copies.HEADER + "VALUE = 1\n")
    (package / "beta" / "cir_contract.py").write_text(check_copies.HEADER + "VALUE = 0  # edited by hand\n")
    assert check_copies.stale_copies(tmp_path) == [package / "beta" / "cir_contract.py"]
    (package / "alpha" / "cir_contract.py").unlink()
    (package / "alpha" / "cir_contract.py").symlink_to("../cir_contract.py")  # a link is stale too
    assert check_copies.fix_copies(tmp_path) == [package / "alpha" / "cir_contract.py",
                                                 package / "beta" / "cir_contract.py"]
    assert check_copies.stale_copies(tmp_path) == []
    assert not (package / "alpha" / "cir_contract.py").is_symlink()
    assert not (package / "storage" / "cir_contract.py").exists()
    shutil.rmtree(package)
