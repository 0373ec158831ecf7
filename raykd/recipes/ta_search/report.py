"""Results of a schedule search: ``results.json``, a short table (one printer, :func:`print_table`,
for both tasks; each names its :class:`Column` s), and the PNG of the classifier's student metric
and lambda-tradeoff against TA sparsity."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` (NaN written as null) and return its path."""
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float).replace("NaN", "null"))
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Column:
    """One column of a results table: ``key`` of the rows, its ``header`` (default the key), its
    ``width`` (values right-aligned) and how a value is written (``fmt``; default 3 decimals for
    floats, ``-`` for None)."""

    key: str
    header: str | None = None
    width: int = 16
    fmt: Callable[[Any], str] = _fmt


CLASSIFIER_COLUMNS = tuple(Column(c) for c in ("sparsity", "params", "ta_dev_metric", "lambda_tradeoff", "student_dev_acc",
                                               "student_test_acc", "status"))
"""The classifier's candidates (MiniDisc's and MaxiDisc's alike): TA and student accuracies."""


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *,
                above: Sequence[str] = (), below: Sequence[str] = (), sep: str = "  ") -> str:
    """Print a table a person can read: the ``above`` lines, a header, one line per row (a
    missing key is None), then the ``below`` lines; also returned as a string."""
    lines = [*above, sep.join(f"{c.header or c.key:>{c.width}}" for c in columns)]
    lines += [sep.join(f"{c.fmt(row.get(c.key)):>{c.width}}" for c in columns) for row in rows]
    text = "\n".join([*lines, *below])
    print(text)
    return text


def classifier_summary(results: dict[str, Any]) -> str:
    """The line under a classifier search's table: the search, the chosen TA, trials, wall time, teacher test accuracy."""
    return (f"search={results['search']} chosen_ta={results.get('chosen_ta')} trials={results['trials_run']} "
            f"wall={results['wall_s']:.0f}s teacher test acc={_fmt(results['teacher']['test_acc'])}")


def plot_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """``<search>.png``: student accuracy (dev, test) and TA dev accuracy against TA sparsity,
    with the lambda-tradeoff curve on the same axes and the chosen TA marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["candidates"]
    xs = [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r.get("ta_dev_metric") if r.get("ta_dev_metric") is not None else float("nan") for r in rows], "o-", color="tab:gray", label="TA dev accuracy")
    ax.plot(xs, [r.get("lambda_tradeoff") if r.get("lambda_tradeoff") is not None else float("nan") for r in rows], "s--", color="tab:orange",
            label=f"lambda-tradeoff (lambda={results['lambda_tradeoff']})")
    trained = [r for r in rows if r.get("student_dev_acc") is not None]
    ax.plot([r["sparsity"] for r in trained], [r["student_dev_acc"] for r in trained], "^", color="tab:blue", ms=9, label="student dev accuracy")
    tested = [r for r in rows if r.get("student_test_acc") is not None]
    ax.plot([r["sparsity"] for r in tested], [r["student_test_acc"] for r in tested], "v", color="tab:green", ms=9, label="student test accuracy")
    direct = results.get("direct")
    if direct and direct.get("student_test_acc") is not None:
        ax.axhline(direct["student_test_acc"], color="tab:red", lw=1, ls=":", label="direct student test accuracy")
    if results.get("chosen_ta") is not None:
        ax.axvline(results["chosen_ta"], color="black", lw=1, ls="-.", label=f"chosen TA {results['chosen_ta']}")
    ax.set_xlabel(f"TA sparsity (share of prunable parameters removed); student at {results['target_sparsity']}")
    ax.set_ylabel("accuracy  /  accuracy + lambda * sparsity")
    ax.set_title(f"{results['search']}: {results['trials_run']} trial(s), {results['wall_s']:.0f} s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = output_dir / f"{results['search']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
