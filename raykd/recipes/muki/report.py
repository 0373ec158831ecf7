"""The MUKI results: ``results.json``, a markdown table (mean +/- std over seeds) and ``muki.png``
(test accuracy per row, over all classes and per teacher's class subset)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from raykd.report import mean_std


def _cell(values: list[float]) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} +/- {s:.3f}"


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """``results.json`` (NaN written as null)."""
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float).replace("NaN", "null"))
    return path


def selection_markdown(sel: dict[str, Any], teachers: list[list[str]]) -> list[str]:
    """The selection report of a partition (before any student trains) as markdown lines."""
    mc = sel.get("muki_score_mc")
    out = [f"Before any student trains ({sel['articles']} train articles): MUKI's score picks the teacher that knows the article for "
           + (f"**{mc:.3f}** (MC dropout), " if mc is not None else "")
           + f"{sel['muki_score_single_pass']:.3f} (one deterministic pass); the raw maximum logit for **{sel['max_logit']:.3f}**.", "",
           f"| teacher | owns | wins ({'MC' if mc is not None else 'single-pass'} score) | certainty on own | on foreign | AUROC own vs foreign"
           " | max-logit AUROC |", "|---|---|---|---|---|---|---|"]
    for i, (names, t) in enumerate(zip(teachers, sel["teachers"])):
        out.append(f"| {i}: {{{', '.join(names)}}} | {t['own_share']:.3f} | {t['wins']:.3f} | {t['certainty_own']:.3f} | "
                   f"{t['certainty_foreign']:.3f} | {t['auroc']:.3f} | {t['max_logit_auroc']:.3f} |")
    return out + [""]


def table_markdown(results: dict[str, Any]) -> str:
    """Per partition: the selection report, then one table of test accuracy over all classes and
    per subset, with each row's wall time."""
    out = []
    for part in results["partitions"]:
        subsets = [" + ".join(b) for b in part["teachers"]]
        out.append(f"**Partition `{part['name']}`**: " + " | ".join(f"teacher {i}: {{{s}}}" for i, s in enumerate(subsets)))
        out.append("")
        if part.get("selection"):
            out += selection_markdown(part["selection"], part["teachers"])
        out.append("| row | test acc (all classes) | 95% CI | " + " | ".join(f"acc on teacher {i}'s classes" for i in range(len(subsets)))
                   + " | target arg-max = gold (train) | most certain teacher = gold class's teacher (train) | wall s per seed |")
        out.append("|---|---|---|" + "---|" * len(subsets) + "---|---|---|")
        for r in part["rows"]:
            picks, target, wall, ci = r.get("score_picks_gold_teacher"), r.get("train_target_acc"), r.get("wall_s"), r.get("ci95")
            out.append(f"| {r['row']} | {_cell(r['overall'])} | {'-' if not ci else f'{ci[0]:.3f} to {ci[1]:.3f}'} | "
                       + " | ".join(_cell(x) for x in r["subsets"])
                       + f" | {'-' if target is None else f'{target:.3f}'} | {'-' if picks is None else f'{picks:.3f}'} | "
                       + (f"{np.mean(wall):.0f}" if wall else "-") + " |")
        out.append("")
    if results.get("partial"):
        out.append(f"**Partial run: all rows have seeds {results.get('seeds_done')} of {results['config']['seeds']}; a row may have "
                   "more (its `seeds` in the JSON); rows without a value had no student finished.**")
    n = results.get("split_sizes", {})
    if n:
        out.append(f"Test accuracy on {n.get('test')} held-out articles (fewer in a partition that leaves classes out); mean +/- std over "
                   f"seeds {results['config']['seeds']} (teachers and the oracle are deterministic: one value). Train {n.get('train')}, "
                   f"dev {n.get('dev')} articles. 95% CI: percentile bootstrap over the test articles of the accuracy averaged over the seeds.")
    cost = results.get("costs", {}).get("encoder_mc_cost")
    if cost:
        out.append("Monte-Carlo dropout over the whole encoder, timed per teacher on a sample: " + "; ".join(
            f"{name.rsplit('-', 2)[-2]}-{name.rsplit('-', 1)[-1]}: {c['articles']} articles, one pass {c['deterministic_s']} s, "
            f"{results['config']['mc']['passes']} passes {c['encoder_mc_s']} s" for name, c in cost.items()) + ".")
    return "\n".join(out)


def plot_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """``muki.png``: per partition, bars of test accuracy (mean, std as error bars) per row,
    over all classes and per teacher's subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = results["partitions"]
    fig, axes = plt.subplots(len(parts), 1, figsize=(11, 4.6 * len(parts)), squeeze=False)
    for ax, part in zip(axes[:, 0], parts):
        rows = part["rows"]
        groups = [("all classes", [r["overall"] for r in rows])] + [
            (f"teacher {i}'s classes", [r["subsets"][i] for r in rows]) for i in range(len(part["teachers"]))]
        x = np.arange(len(rows))
        width = 0.8 / len(groups)
        for g, (label, values) in enumerate(groups):
            stats = [mean_std(v) for v in values]
            ax.bar(x + (g - (len(groups) - 1) / 2) * width, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=label)
        ax.set_xticks(x, [r["row"].split(" (")[0] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"partition {part['name']}: " + " | ".join("{" + ", ".join(b) + "}" for b in part["teachers"]), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(groups))
    fig.tight_layout()
    path = output_dir / "muki.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
