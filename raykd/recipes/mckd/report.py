"""The MCKD results: ``results.json``, a markdown table (mean +/- std over seeds) and ``mckd.png``
(the final student's test score and the pseudo-labels' quality, by stage)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from raykd.report import mean_std

FILES = (("results.json", ".json"), ("results.md", ".md"), ("mckd.png", ".png"))

_NAMES = {"accuracy": "test accuracy", "macro_f1": "test macro-F1", "rouge_l": "test ROUGE-L"}


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} +/- {s:.3f}"


def results_table(results: dict[str, Any]) -> str:
    """The markdown table: one row per method, test metrics and the quality of what it learned from."""
    metrics = list(results["rows"][0]["test"])
    quality = metrics[0]
    out = ["| row | " + " | ".join(_NAMES.get(m, m) for m in metrics) + f" | 95% CI of the {_NAMES.get(metrics[0], metrics[0])}"
           " | minus vanilla KD (paired 95% CI)"
           f" | its training labels' {quality.replace('_', '-')} (unlabeled split, vs gold) | wall s per seed |", "|---|" + "---|" * (len(metrics) + 4)]
    for r in results["rows"]:
        wall, ci, vs = r.get("wall_s") or [], r.get("ci95"), r.get("vs_vanilla KD (LLM labels)")
        out.append(f"| {r['row']} | " + " | ".join(_cell(r["test"][m]) for m in metrics) + f" | {'-' if not ci else f'{ci[0]:.3f} to {ci[1]:.3f}'} | "
                   + ("-" if not vs or r["row"].startswith("vanilla KD (") else f"{vs[0]:+.3f} ({vs[1]:+.3f} to {vs[2]:+.3f})")
                   + f" | {_cell(r['label_quality'].get(quality))} | " + (f"{np.mean(wall):.0f}" if wall else "-") + " |")
    n, lab, costs = results["split_sizes"], results["labeler"], results["costs"]
    seeds = results["config"]["seeds"]
    out += ["", f"Test split: {n['test']} articles; {n['gold']} gold, {n['unlabeled']} unlabeled articles. Mean +/- std over seeds "
            f"{seeds} (the LLM labeler is deterministic: one value); 95% CI: percentile bootstrap over the test articles of the "
            f"score averaged over the seeds. Wall s: the row's students (a MCKD row: its stages too) and test predictions. Labeler: {lab['model']}, {lab['shots']} shot(s)"
            f"{' per class' if results['task'] == 'classification' else ''}, calibration {'on' if lab['calibrate'] else 'off'}"
            + (f" (chosen on {lab['held_out_gold']} held-out gold examples: "
               + ", ".join(f"{c['shots']} shots{' + cal' if c['calibrate'] else ''} {c['held_out']:.3f}" for c in lab["candidates"]) + "). "
               if len(lab["candidates"]) > 1 else " (the only candidate). ")
            + f"LLM labeling (as recorded in the pseudo-label caches): {costs.get('recorded_label_s', costs['label_s'])} s, "
            f"{costs.get('recorded_label_tokens', costs['label_tokens'])} document tokens. This run: {costs['llm_calls']} LLM calls, "
            f"{costs['student_trainings']} students trained, {costs.get('relabels', 0)} relabelings."]
    if "pool" in lab:
        out += ["", pool_table(lab["pool"], results["classes"])]
    return "\n".join(out)


def pool_table(pool: dict[str, Any], classes: list[str]) -> str:
    """The labeler on the unlabeled pool: accuracy, the confusion matrix (rows: gold class) and
    the per-class counts of its labels against the gold counts."""
    out = [f"The LLM's labels of the unlabeled pool: accuracy {pool['accuracy']:.3f}. Confusion (rows: gold class, columns: "
           "the LLM's class):", "", "| gold \\ LLM | " + " | ".join(classes) + " | gold count |", "|---|" + "---|" * (len(classes) + 1)]
    for name, row, n in zip(classes, pool["confusion"], pool["counts_gold"]):
        out.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {n} |")
    out.append("| LLM count | " + " | ".join(str(v) for v in pool["counts_labeler"]) + f" | {sum(pool['counts_gold'])} |")
    return "\n".join(out)


def write_all(output_dir: Path, results: dict[str, Any]) -> None:
    """``results.json`` (NaN as null), ``results.md`` and ``mckd.png`` in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float).replace("NaN", "null"))
    (output_dir / "results.md").write_text(results_table(results) + "\n")
    plot_stages(output_dir / "mckd.png", results)


def plot_stages(path: Path, results: dict[str, Any]) -> Path:
    """Test score of the final student after 0 (vanilla KD) .. S stages, the quality of its
    training labels, and the LLM and supervised references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    metric = next(iter(rows[0]["test"]))
    students = [r for r in rows if r["kind"] == "student"]
    x = np.arange(len(students))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("test", f"final student, {_NAMES.get(metric, metric)}"), ("label_quality", f"its training labels vs gold ({metric})")):
        stats = [mean_std(r[key].get(metric, [])) for r in students]
        ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
    for r, style in zip([r for r in rows if r["kind"] != "student"], ("--", ":", "-.", (0, (1, 3)), (0, (5, 5)), (0, (3, 1, 1, 1)), (0, (8, 2)))):
        ax.axhline(mean_std(r["test"][metric])[0], linestyle=style, color="gray", label=r["row"])
    ax.set_xticks(x, ["vanilla KD" if i == 0 else f"{i} stage{'s' if i > 1 else ''}" for i in range(len(students))])
    ax.set_ylabel(metric)
    ax.set_title(f"MCKD on BBC News ({results['task']}): by stage", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish(output_dir: Path, stem: Path) -> list[Path]:
    """Copy the results to ``<stem>.json``, ``.md`` and ``.png``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(output_dir / src, stem.with_name(stem.name + ext))) for src, ext in FILES]
