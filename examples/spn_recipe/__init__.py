"""The embedded default: SPN's whole recipe on the synthetic compositional benchmark (example code, not library
code). `python examples/run_cir.py` with no `--dataset` runs it; the eight steps of docs/reproduction.md are
`recipe.recipe_steps`, the lanes `lanes.py`, the diagnostics `seeds.py`, `noise_study.py`, `text_form_probe.py`."""

from .cli import main, recipe_parser
from .config import ROWS, RecipeConfig
from .recipe import run_default_recipe
from .report import format_table

__all__ = ["ROWS", "RecipeConfig", "format_table", "main", "recipe_parser", "run_default_recipe"]
