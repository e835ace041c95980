"""spn4cir training and evaluation: losses, candidate bank, CIRTrainer, exact CIR metrics."""

from pathlib import Path

_METRICS = Path(__file__).parent / "metrics"


def metric_path(name: str) -> str:
    """Path of a bundled `evaluate` metric script (`"cirr"`, `"fashioniq"`, `"circo"`) for `evaluate.load`."""
    path = _METRICS / name / f"{name}.py"
    if not path.exists():
        available = sorted(p.name for p in _METRICS.iterdir() if p.is_dir())
        raise ValueError(f"No bundled metric {name!r}; available: {available}.")
    return str(path)
