"""Every relative link, image and anchor of README.md and docs/*.md resolves: the file exists and the anchor is a
heading of it, slugged as GitHub slugs headings (so a section moved to another page cannot leave a dead link)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def prose(text: str) -> str:
    """The text outside code blocks, inline code removed (a `[x](y)` in code is not a link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, counts = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)  # a repeated heading gets -1, -2, ...
            counts[base] = counts.get(base, 0) + 1
    return found


def links():
    for doc in DOCS:
        for target in LINK.findall(prose(doc.read_text(encoding="utf-8"))):
            if not re.match(r"^[a-z]+:", target):
                yield pytest.param(doc, target, id=f"{doc.relative_to(ROOT)}:{target}")


def test_slug_is_githubs():
    assert slug("Converting the published SPN4CIR / CLIP4Cir checkpoints") == \
        "converting-the-published-spn4cir--clip4cir-checkpoints"
    assert slug("LoRA (PEFT)") == "lora-peft" and slug("The default's table") == "the-defaults-table"
    assert slug("`run_cir.py` options") == "run_cirpy-options"


def test_the_docs_link_each_other():
    assert len(list(links())) >= 20


@pytest.mark.parametrize(("doc", "target"), links())
def test_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name}: {target} names a missing file"
    if anchor:
        assert file.suffix == ".md", f"{doc.name}: {target}: an anchor into a file that is not Markdown"
        assert anchor in anchors(file), f"{doc.name}: {target}: no heading of {file.name} has that anchor"
