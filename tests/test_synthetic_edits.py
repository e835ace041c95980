"""The synthetic world's modification grammar for any two scenes (`datasets_scripts.synthetic_edits`): every single
modification of the benchmark is one clause of it and reads back as that clause; the clauses of any two scenes
rebuild the target from the reference; texts are scored clause by clause."""

import random
from dataclasses import replace

import pytest

from datasets_scripts.synthetic import (
    CELLS,
    MODIFICATIONS,
    Obj,
    modify,
    random_scene,
    scene_key,
)
from datasets_scripts.synthetic_edits import (
    describe_difference,
    difference,
    edit_scores,
    parse_clause,
    parse_edit,
)


def _apply(scene, clauses):
    """The scene after each clause in turn, written independently of `difference`: objects are named by colour and
    shape, cells by their names."""
    objects = list(scene)

    def find(colour, shape):
        (i,) = [i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape)]
        return i

    for clause in clauses:
        kind = clause[0]
        if kind == "add":
            _, size, colour, shape, cell = clause
            objects.append(Obj(shape, colour, size, CELLS.index(cell)))
            continue
        i = find(clause[1], clause[2])
        if kind == "remove":
            objects.pop(i)
        else:
            field = {"move": "cell", "resize": "size", "recolour": "colour", "reshape": "shape"}[kind]
            value = CELLS.index(clause[3]) if kind == "move" else clause[3]
            objects[i] = replace(objects[i], **{field: value})
    return tuple(objects)


@pytest.mark.parametrize("kind", MODIFICATIONS)
def test_each_modification_of_the_benchmark_is_one_clause_that_reads_back(kind):
    rng, seen = random.Random(kind), 0
    while seen < 150:
        reference = random_scene(rng)
        result = modify(reference, kind, rng)
        if result is None:
            continue
        target, text = result
        seen += 1
        assert difference(reference, target) == parse_edit(text) and parse_edit(text)[0][0] == kind, text
        assert parse_clause(describe_difference(reference, target, rng)) == parse_clause(text)


def test_the_clauses_of_any_two_scenes_rebuild_the_target_and_the_text_reads_back_as_them():
    rng = random.Random(0)
    kinds = set()
    for _ in range(500):
        reference, target = random_scene(rng), random_scene(rng)
        clauses = difference(reference, target)
        assert scene_key(_apply(reference, clauses)) == scene_key(target)
        assert parse_edit(describe_difference(reference, target, rng)) == clauses
        kinds |= {c[0] for c in clauses}
    assert kinds == set(MODIFICATIONS)  # random pairs need every kind of clause
    same = random_scene(rng)
    assert difference(same, same) == [] and describe_difference(same, same, rng) == ""


def test_texts_are_scored_clause_by_clause():
    truth = [("remove", "red", "circle"), ("add", "small", "blue", "square", "top")]
    scores = edit_scores(["remove the red circle and add a small blue square at the top",  # exact
                          "take away the red circle and make the pink cross blue and it is nice"],
                         [truth, truth])
    # of the 5 parts written, 3 are true clauses (one is a wrong clause, one no clause of the grammar)
    assert scores["clause_precision"] == pytest.approx(100 * 3 / 5)
    assert scores["clause_recall"] == pytest.approx(100 * 3 / 4) and scores["exact"] == 50.0
    assert parse_clause("it is nice") is None
    assert parse_clause("Replace the red circle with a red square") == ("reshape", "red", "circle", "square")
    assert parse_clause("replace the red circle with a blue square") is None  # the paraphrase repeats the colour
