"""The synthetic benchmark's modification grammar (`synthetic.PARAPHRASES`) applied to any two scenes: what changes
from a reference scene to a target scene, as the world's own edit clauses, written out in its paraphrases, and read
back from a text. The recipe trains its stand-in edit writer on `pretrain` pairs described this way and scores the
texts it writes (never given to a CIR model: the scene graph is analysis-only metadata).

A clause is a tuple: `("remove", colour, shape)`, `("move", colour, shape, cell)`, `("resize", colour, shape, size)`,
`("recolour", colour, shape, new colour)`, `("reshape", colour, shape, new shape)`, `("add", size, colour, shape,
cell)`; `cell` is the cell's name (`"top left"`). A single modification of `synthetic.modify` is one clause, written
in one of its paraphrases; any two scenes differ by a list of them (`difference`).
"""

from __future__ import annotations

import json
import random
import re

from .synthetic import CELLS, COLOURS, PARAPHRASES, SHAPES, SIZES, Obj, Scene

JOIN = " and "  # between the clauses of one text (no paraphrase contains "and")
_KIND_ORDER = {"remove": 0, "move": 1, "recolour": 1, "reshape": 1, "resize": 1, "add": 2}


def scene_from_json(text: str) -> Scene:
    """A scene from the corpus column `scene` (JSON)."""
    return tuple(Obj(**o) for o in json.loads(text))


def difference(reference: Scene, target: Scene) -> list[tuple]:
    """The clauses that turn `reference` into `target`, in order: removals, then changes, then additions, each
    group by grid cell. An object of both scenes (same colour and shape) is moved and/or resized; an object left
    over in the reference whose cell a left-over target object holds with its shape (or its colour) is recoloured
    (or reshaped), then resized if needed (the later clause names it by its new colour and shape); the other
    left-over objects are removed and added."""
    keyed = {(o.colour, o.shape): o for o in target}
    clauses: list[tuple[int, int, tuple]] = []
    rest_reference, rest_target = [], [o for o in target if not any(
        (o.colour, o.shape) == (r.colour, r.shape) for r in reference)]
    for o in sorted(reference, key=lambda x: x.cell):
        t = keyed.get((o.colour, o.shape))
        if t is None:
            rest_reference.append(o)
            continue
        if t.cell != o.cell:
            clauses.append((1, o.cell, ("move", o.colour, o.shape, CELLS[t.cell])))
        if t.size != o.size:
            clauses.append((1, o.cell, ("resize", o.colour, o.shape, t.size)))
    for o in rest_reference:
        t = next((t for t in sorted(rest_target, key=lambda x: x.cell) if t.cell == o.cell and
                  (t.shape == o.shape or t.colour == o.colour)), None)
        if t is None:
            clauses.append((0, o.cell, ("remove", o.colour, o.shape)))
            continue
        rest_target.remove(t)
        change = ("recolour", o.colour, o.shape, t.colour) if t.shape == o.shape else ("reshape", o.colour, o.shape,
                                                                                        t.shape)
        clauses.append((1, o.cell, change))
        if t.size != o.size:
            clauses.append((1, o.cell, ("resize", t.colour, t.shape, t.size)))
    clauses += [(2, t.cell, ("add", t.size, t.colour, t.shape, CELLS[t.cell])) for t in rest_target]
    return [clause for _, _, clause in sorted(clauses, key=lambda c: (c[0], c[1]))]


def render_clause(clause: tuple, rng: random.Random) -> str:
    """One clause in one of the world's paraphrases of its kind (drawn with `rng`)."""
    kind, template = clause[0], rng.choice(PARAPHRASES[clause[0]])
    if kind == "add":
        _, size, colour, shape, cell = clause
        return template.format(size=size, colour=colour, shape=shape, cell=cell)
    colour, shape = clause[1], clause[2]
    if kind == "remove":
        return template.format(colour=colour, shape=shape)
    if kind == "move":
        return template.format(colour=colour, shape=shape, cell=clause[3])
    if kind == "resize":
        return template.format(colour=colour, shape=shape, new=clause[3],
                               change="bigger" if clause[3] == "large" else "smaller")
    return template.format(colour=colour, shape=shape, new=clause[3])  # recolour, reshape


def describe_difference(reference: Scene, target: Scene, rng: random.Random) -> str:
    """The modification from `reference` to `target` in the world's grammar: its clauses joined by " and "."""
    return JOIN.join(render_clause(c, rng) for c in difference(reference, target))


def _alternatives(values) -> str:
    return "(?:" + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)) + ")"


def _clause_patterns() -> list[tuple[str, re.Pattern]]:
    """One regular expression per paraphrase, its fields as named groups."""
    fields = {"size": SIZES, "colour": list(COLOURS), "shape": SHAPES, "cell": CELLS, "change": ("bigger", "smaller")}
    new = {"recolour": list(COLOURS), "reshape": SHAPES, "resize": SIZES}
    patterns = []
    for kind, templates in PARAPHRASES.items():
        for template in templates:
            seen, pattern = set(), ""
            for part in re.split(r"(\{\w+\})", template):
                name = part[1:-1] if part.startswith("{") else None
                if name is None:
                    pattern += re.escape(part)
                elif name in seen:
                    pattern += f"(?P={name})"
                else:
                    seen.add(name)
                    pattern += f"(?P<{name}>{_alternatives(new[kind] if name == 'new' else fields[name])})"
            patterns.append((kind, re.compile(pattern)))
    return patterns


_PATTERNS = _clause_patterns()


def parse_clause(text: str) -> tuple | None:
    """The clause a text of one paraphrase says, or None when it is no paraphrase of the grammar."""
    text = " ".join(text.lower().split())
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        g = match.groupdict()
        if kind == "add":
            return kind, g["size"], g["colour"], g["shape"], g["cell"]
        if kind == "remove":
            return kind, g["colour"], g["shape"]
        if kind == "move":
            return kind, g["colour"], g["shape"], g["cell"]
        if kind == "resize":
            return kind, g["colour"], g["shape"], g.get("new") or ("large" if g["change"] == "bigger" else "small")
        return kind, g["colour"], g["shape"], g["new"]
    return None


def parse_edit(text: str) -> list[tuple | None]:
    """The clauses of a text (split at " and "); None for a part that is no clause of the grammar."""
    return [parse_clause(part) for part in text.lower().split(JOIN) if part.strip()]


def edit_scores(texts: list[str], truths: list[list[tuple]]) -> dict[str, float]:
    """How well `texts` say the modifications `truths` (each a `difference`): of the texts' clauses, the % that are
    a clause of the truth (precision; a part that is no clause counts as wrong), the % of the truths' clauses said
    (recall), and the % of texts saying exactly their truth's clauses (as sets)."""
    said = right = wanted = exact = 0
    for text, truth in zip(texts, truths, strict=True):
        clauses = parse_edit(text)
        hits = set(clauses) & set(truth)
        said, right, wanted = said + len(clauses), right + len(hits), wanted + len(truth)
        exact += set(clauses) == set(truth) and None not in clauses
    return {"clause_precision": 100 * right / max(said, 1), "clause_recall": 100 * right / max(wanted, 1),
            "exact": 100 * exact / max(len(texts), 1), "texts": len(texts)}


__all__ = ["JOIN", "describe_difference", "difference", "edit_scores", "parse_clause", "parse_edit",
           "render_clause", "scene_from_json"]
