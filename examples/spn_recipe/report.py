"""How the recipe shows its results: the ablation table, the captions' precision, the recall-at-K plot."""

from __future__ import annotations

from pathlib import Path

from .config import KS, ROWS


def format_table(results: dict, rows=ROWS) -> str:
    """A markdown table; a cell is a number, or `{"mean", "std"}` (several seeds), printed as mean ± std."""
    def cell(value) -> str:
        return f"{value['mean']:.2f} ± {value['std']:.2f}" if isinstance(value, dict) else f"{value:.2f}"

    lines = ["| model | " + " | ".join(f"R@{k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell(results[row][f"recall@{k}"]) for k in KS) + " |")
    return "\n".join(lines)


def precision_line(name: str, p: dict) -> str:
    return (f"{name}: {p['phrase_precision']:.1f}% of phrases name an object of the scene exactly, "
            f"{p['colour_shape_precision']:.1f}% by colour + shape ({p['object_recall']:.1f}% of objects named)")


def recall_line(row: str, metrics: dict) -> str:
    return f"{row}: test " + ", ".join(f"R@{k} {metrics[f'recall@{k}']:.2f}" for k in KS)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recall_at_k(results: dict, path: Path, rows=ROWS) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in rows:
        ax.plot(KS, [results[row][f"recall@{k}"] for k in KS], marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("SPN ablation, synthetic CIR (test)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
