"""Model cards, written once: the YAML metadata through `huggingface_hub.ModelCardData`, then the markdown. Used by
the converters (`conversion_utils.conversion_card`), the model zoo (`trainers.zoo.cards`) and `CIRTrainer`."""

from __future__ import annotations

from collections.abc import Iterable

from huggingface_hub import ModelCardData

USAGE = """```python
import modeling_spn4cir  # or pass trust_remote_code=True
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("<this repo>")
processor = AutoProcessor.from_pretrained("<this repo>")
```"""


def table(rows: Iterable[tuple[str, object]], header: tuple[str, str] = ("field", "value")) -> str:
    """A two-column markdown table."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])


def render_card(metadata: ModelCardData, title: str, *sections: str) -> str:
    """`---` YAML front matter `---`, `# title`, then the non-empty `sections` as paragraphs."""
    body = "\n\n".join(section.strip("\n") for section in sections if section)
    return f"---\n{metadata.to_yaml()}\n---\n# {title}\n\n{body}\n"


__all__ = ["USAGE", "render_card", "table"]
