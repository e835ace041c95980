"""Modification-text templates of SPN's positive scaling: `{0}` = reference caption, `{1}` = target caption.

The original code's templates by index (`--p_list`): 0 `"{1} instead of {0}"`, 1 `"Unlike {0}, I want {1}"`,
2 `"{1}"`. FashionIQ uses 2; CIRR uses 0 and 1 (both stored; one is drawn per sample in training). A composed
text too long for the text encoder falls back to `"{1}"`, as the original does when `clip.tokenize` fails.
"""

from __future__ import annotations

from collections.abc import Sequence

TEMPLATES = ("{1} instead of {0}", "Unlike {0}, I want {1}", "{1}")
DATASET_TEMPLATES = {"fashioniq": (2,), "cirr": (0, 1), "circo": (0, 1)}
TARGET_ONLY = "{1}"


def resolve_templates(templates: Sequence[int | str] | None, dataset: str | None = None) -> list[str]:
    """Template strings from indices into `TEMPLATES` and/or user strings (with `{0}`/`{1}`); by default the
    dataset's (CIRR's for unknown datasets)."""
    chosen = templates if templates else DATASET_TEMPLATES.get(dataset or "", DATASET_TEMPLATES["cirr"])
    out = []
    for t in chosen:
        if isinstance(t, int) or (isinstance(t, str) and t.isdigit()):
            index = int(t)
            if not 0 <= index < len(TEMPLATES):
                raise ValueError(f"Template index {index} out of range 0..{len(TEMPLATES) - 1}.")
            out.append(TEMPLATES[index])
        elif "{1}" in t:
            out.append(t)
        else:
            raise ValueError(f"Template {t!r} must contain {{1}} (the target caption).")
    return out


def compose_modification_texts(reference_caption: str, target_caption: str, templates: Sequence[str],
                               tokenizer=None, max_length: int | None = None) -> list[str]:
    """One text per template; a text longer than `max_length` tokens (with `tokenizer`) becomes `"{1}"`."""
    texts = []
    for template in templates:
        for placeholder, caption, which in (("{0}", reference_caption, "reference"), ("{1}", target_caption, "target")):
            if placeholder in template and (not isinstance(caption, str) or not caption.strip()):
                raise ValueError(f"The {which} caption is empty ({caption!r}): template {template!r} would give a "
                                 "meaningless modification text.")
        text = template.format(reference_caption, target_caption)
        if tokenizer is not None and max_length is not None and len(tokenizer(text)["input_ids"]) > max_length:
            text = TARGET_ONLY.format(reference_caption, target_caption)
        texts.append(text)
    return texts
