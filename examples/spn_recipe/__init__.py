"""The embedded default: SPN's whole recipe on the synthetic compositional benchmark (example code, not library
code). `python examples/run_cir.py` with no `--dataset` runs it; see `recipe.py`."""

from .recipe import ROWS, RecipeConfig, format_table, main, recipe_parser, run_default_recipe

__all__ = ["ROWS", "RecipeConfig", "format_table", "main", "recipe_parser", "run_default_recipe"]
