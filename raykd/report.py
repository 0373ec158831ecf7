"""Run reports: a table on screen, ``report.md``, ``report.json`` and a PNG of the loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_ROWS = ("teacher", "student_init")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one value); NaN for none (None and
    NaN entries are skipped)."""
    import math

    import numpy as np

    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def bootstrap_ci(scores: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap confidence interval of a mean score over test items.

    Args:
        scores: per-item scores ``[S, N]`` (``S`` seeds or runs scored on the same ``N`` test
            items, e.g. 0/1 correctness or ROUGE-L) or ``[N]``; the statistic is the mean over
            seeds and items, and the items (columns) are resampled together across seeds.
        n_boot: resamples; level: the interval's coverage; seed: the resampling's seed.

    Returns:
        ``(low, high)``; NaN for no items.

    Source: Efron and Tibshirani, "An Introduction to the Bootstrap" (1993), the percentile interval.
    """
    import numpy as np

    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] == 0:
        return float("nan"), float("nan")
    per_item = s.mean(0)
    idx = np.random.default_rng(seed).integers(0, len(per_item), (n_boot, len(per_item)))
    means = per_item[idx].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def model_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) for the teacher, the untrained student and every trained student."""
    rows = [(name, report[name]) for name in MODEL_ROWS if name in report]
    rows += [(name, report[name]) for name in report.get("students", [])]
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3e}"
    return "-" if value is None else str(value)


def _count(n: Any) -> str:
    """A parameter count as the README writes it: 134.5M, 47.4K."""
    if not isinstance(n, int):
        return _fmt(n)
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _label_form(cache: dict[str, Any]) -> str:
    """``k=32`` for top-k soft labels, ``sampled S=32`` for sampled ones."""
    return f"sampled S={cache['samples']}" if cache.get("form") == "sampled" else f"k={cache['k']}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (models table, cache line, timings)."""
    lines = [f"# raykd distill: {report['run_name']}", "",
             "| model | params | held-out ppl | ECE | top-1 agreement | KL(teacher, student) | objective | steps |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in model_rows(report):
        objective = ", ".join(f"{w} {k}" for k, w in m.get("objective", {}).items()) or "-"
        lines.append(
            f"| {name} | {_fmt(m.get('params'))} | {_fmt(m['ppl'], 2)} | {_fmt(m.get('ece'))} | {_fmt(m['top1_agreement'])} "
            f"| {_fmt(m.get('kl'))} | {objective} | {_fmt(m.get('steps'))} |"
        )
    c = report["cache"]
    lines += [
        "",
        f"Soft-label cache: `{c['path']}`: {c['rows']} rows, {c['tokens']} tokens, {c['bytes']:,} bytes "
        f"({c['bytes_per_token']:.1f} B/token), {_label_form(c)}, temperature={c['temperature']}, "
        f"hit={c['hit']}, teacher calls={c['teacher_calls']}.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
    ]
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    """Print the models table and the cache/timing lines with ``rich``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"raykd distill: {report['run_name']}")
    for col in ("model", "params", "held-out ppl", "ECE", "top-1 agreement", "KL(teacher, student)", "steps"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, m in model_rows(report):
        table.add_row(name, _count(m.get("params")), _fmt(m["ppl"], 2), _fmt(m.get("ece")), _fmt(m["top1_agreement"]),
                      _fmt(m.get("kl")), _fmt(m.get("steps")))
    console = Console()
    console.print(table)
    c = report["cache"]
    console.print(
        f"cache {'HIT' if c['hit'] else 'written'}: {c['rows']} rows, {c['tokens']} tokens, "
        f"{c['bytes_per_token']:.1f} B/token, teacher calls {c['teacher_calls']}"
    )
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))


def print_files(report: dict[str, Any], output_dir: Path) -> None:
    """Print where a run's files are: the report, the exported students, the logs."""
    students = [_short(report[name]["model_dir"]) for name in report.get("students", []) if "model_dir" in report.get(name, {})]
    lines = [f"report:   {_short(output_dir / 'report.md')} (report.json, loss_curves.png beside it)"]
    if students:
        lines.append("students: " + ", ".join(students))
    lines.append(f"logs:     {_short(output_dir / 'logs')}/ (raykd.log; Ray's own logs under ray/)")
    print("\n".join(lines))


def _short(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


NOT_PLOTTED = ("step", "lr", "on_policy", "replayed", "teacher_calls", "data_s", "sample_s", "teacher_wait_s", "update_s")
"""History fields that are not loss terms: the step, the learning rate, and an on-policy step's kind,
teacher calls and time split (:mod:`raykd.train.on_policy`)."""


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """PNG with one panel per logged term (``loss``, ``ce``, ``forward_kl`` ...) and one line per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({k for h in histories.values() for row in h for k in row if k not in NOT_PLOTTED})
    fig, axes = plt.subplots(1, len(terms), figsize=(5 * len(terms), 3.6), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, hist in histories.items():
            pts = [(r["step"], r[term]) for r in hist if term in r]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(term + (" (total, training)" if term == "loss" else " per token"))
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], output_dir: Path, histories: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``report.json``, ``report.md`` and ``loss_curves.png`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if histories:
        report["loss_curves"] = str(plot_losses(histories, output_dir / "loss_curves.png"))
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (output_dir / "report.md").write_text(render_markdown(report))
