"""Keep the copies of the shipped shared file identical to the original (as transformers' `utils/check_copies.py`).

`modeling_spn4cir/cir_contract.py` is the original; every family folder holds a copy (`save_pretrained` ships the
folder's files for `trust_remote_code` loading, and a copy works where a symlink does not: Windows checkouts, zip
downloads). A copy is the original's text under one header line saying where it comes from.

    python utils/check_copies.py          # exit 1 and name the copies that differ
    python utils/check_copies.py --fix    # rewrite them from the original
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = Path("modeling_spn4cir") / "cir_contract.py"
HEADER = f"# Copied from {ORIGINAL.as_posix()} by `python utils/check_copies.py --fix`: edit the original.\n"


def copy_paths(root: Path = ROOT) -> list[Path]:
    """Where the copies live: `cir_contract.py` in every family folder (a package inside `modeling_spn4cir/` with a
    `modeling_*.py`; other subpackages, such as `storage/`, ship nothing with checkpoints)."""
    package = root / ORIGINAL.parent
    return sorted(folder / ORIGINAL.name for folder in package.iterdir()
                  if (folder / "__init__.py").is_file() and any(folder.glob("modeling_*.py")))


def expected_copy(root: Path = ROOT) -> str:
    return HEADER + (root / ORIGINAL).read_text()


def stale_copies(root: Path = ROOT) -> list[Path]:
    """The copies that are missing, symlinks, or differ from the original."""
    expected = expected_copy(root)
    return [path for path in copy_paths(root)
            if path.is_symlink() or not path.is_file() or path.read_text() != expected]


def fix_copies(root: Path = ROOT) -> list[Path]:
    """Rewrite every stale copy from the original (a symlink is replaced by a file); returns what was rewritten."""
    stale = stale_copies(root)
    for path in stale:
        if path.is_symlink():
            path.unlink()
        path.write_text(expected_copy(root))
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite the copies that differ from the original")
    args = parser.parse_args(argv)
    if args.fix:
        for path in fix_copies():
            print(f"rewrote {path.relative_to(ROOT)}")
        return 0
    stale = stale_copies()
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from {ORIGINAL}; run `python utils/check_copies.py --fix`.")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
