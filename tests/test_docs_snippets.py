"""Every Python snippet of the README and of docs/*.md runs, on tiny models built in the test.

Snippets name their inputs with the placeholders below (a model id, a gallery folder, a dataset directory, a few
PIL images); the test puts tiny stand-ins behind those names and runs each snippet as written. A snippet that uses a
name or a path not listed here fails, which is how a new snippet gets its stand-in."""

import re
from pathlib import Path

import pytest

from conftest import solid_images

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{doc.relative_to(ROOT)}:{line}")


def test_the_docs_have_python_snippets():
    assert len(list(snippets())) >= 3


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code, tiny_model_dir, tiny_cir_dataset, image_dir, monkeypatch, tmp_path):
    places = {"path/or/hub-id": tiny_model_dir, "out/stage2": tiny_model_dir, "my_images/": image_dir,
              "fashioniq-hf": tiny_cir_dataset}
    for placeholder, path in places.items():
        code = code.replace(f'"{placeholder}"', repr(str(path)))
    images = solid_images(5, size=40, seed=1)
    namespace = {"reference_image": images[0], "image": images[0], "image1": images[1], "image2": images[2],
                 "candidate_images": images[2:]}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), namespace)
