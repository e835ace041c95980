"""The recipe's lanes (`spn_recipe.lanes`): the same steps give the same values in one process and split over two;
a lane that dies is an error, not a hang; a plan that cannot run is refused before anything runs."""

import multiprocessing
import types

import pytest
import torch
from spn_recipe.config import RecipeConfig
from spn_recipe.lanes import Step, run_steps
from spn_recipe.recipe import recipe_lanes, recipe_steps

LANES = (("scale", "combine"), ("offset", "where"))


def _toy_steps(fail: bool = False) -> list[Step]:
    """Four steps; the second lane's `offset` reads the first lane's `scale`, `combine` reads both lanes."""
    def offset(scale):
        if fail:
            raise RuntimeError("offset failed")
        return scale + 1

    def where():
        return {"process": multiprocessing.current_process().name, "threads": torch.get_num_threads()}

    return [
        Step("scale", lambda: 3),
        Step("offset", offset, ("scale",)),
        Step("where", where),
        Step("combine", lambda scale, offset, where: [scale * offset, where["process"]], ("scale", "offset", "where")),
    ]


@pytest.mark.slow
def test_steps_give_the_same_values_in_one_process_and_in_two_lanes(tmp_path):
    one = run_steps(_toy_steps(), LANES)
    assert one.values["combine"] == [12, "MainProcess"] and one.values["offset"] == 4
    assert set(one.seconds) == {"first lane", "second lane"} and set(one.seconds["second lane"]) == {"offset", "where"}
    threads = torch.get_num_threads()
    two = run_steps(_toy_steps(), LANES, in_processes=True, exchange_dir=tmp_path / "lanes", lane_steps=_toy_steps)
    assert {k: v for k, v in two.values.items() if k not in ("where", "combine")} == {"scale": 3, "offset": 4}
    # the second lane's steps ran in a process of their own, with one thread; the first lane received their values
    assert two.values["where"] == {"process": "second-lane", "threads": 1}
    assert two.values["combine"] == [12, "second-lane"]
    assert "offset" in two.seconds["second lane"] and torch.get_num_threads() == threads


@pytest.mark.slow
def test_a_failing_lane_is_an_error_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match="second-lane"):
        run_steps(_toy_steps(), LANES, in_processes=True, exchange_dir=tmp_path / "lanes",
                  lane_steps=_failing_toy_steps)


def _failing_toy_steps() -> list[Step]:  # a module-level function: the spawned lane unpickles it by name
    return _toy_steps(fail=True)


def test_plans_that_cannot_run_are_refused():
    steps = _toy_steps()
    with pytest.raises(ValueError, match="'offset' reads \\['scale'\\], which no earlier step"):
        run_steps([steps[1], steps[0]], LANES)
    with pytest.raises(ValueError, match="must name every step once"):
        run_steps(steps, (("scale",), ("offset", "where")))
    # the first lane would wait for `offset` before `scale`, which `offset` reads
    with pytest.raises(ValueError, match="wait for each other for ever"):
        run_steps(steps, (("combine", "scale"), ("offset", "where")), in_processes=True)


@pytest.mark.parametrize("captioner", ["generative", "retrieval", "oracle"])
def test_the_recipe_plan_runs_in_both_modes(captioner):
    """The README's steps in order, and two lanes that can run them (checked by playing them through); the
    retrieval captioner is the stage-1 model, so its lane trains stage 1 before captioning."""
    cfg = RecipeConfig(captioner=captioner)
    run = types.SimpleNamespace(cfg=cfg, **{name: (lambda *values: None) for name in (
        "stage0", "stage1", "train_captioner", "caption_pool", "positive_scaling", "zero_shot_triplets", "plus_n",
        "plus_n_lora", "plus_p", "plus_p_n", "zero_shot", "caption_precision")})
    steps = recipe_steps(run)
    assert [s.name for s in steps] == ["stage 0", "stage 1", "captioner", "pool captions", "positive scaling",
                                       "zero-shot triplets", "+N", "+N (LoRA)", "+P", "+P+N", "zero-shot",
                                       "caption precision"]
    first, second = recipe_lanes(cfg)
    assert first == ("stage 0", "positive scaling", "+P", "+P+N")
    captioned_after = "stage 1" if captioner == "retrieval" else "captioner"
    assert second.index(captioned_after) < second.index("pool captions")
    assert set(run_steps(steps, (first, second)).values) == {s.name for s in steps}  # the plan's checks pass
