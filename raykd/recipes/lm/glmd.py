"""GLMD as its seed runs it: a task-agnostic stage at a high temperature, then the task stage.

GLMD (Tan et al. 2023, "Are Intermediate Layers and Labels Really Necessary? A General Language
Model Distillation Method", Findings of ACL; code in GKD, ``aitsc/GLMKD``) distils from logits
only, first task-agnostically at distillation temperature 15, then on the task at temperature 1.

1. **Task-agnostic stage** (``agnostic_stage``): the main job's student trained for
   ``agnostic_stage.steps`` at ``agnostic_stage.temperature``. Its teacher runs online in the Train
   workers (dense logits over the whole vocabulary) by default: at temperature 15 a top-32 cache
   holds 0.2% of SmolLM2's mass and its bucketed loss points elsewhere than the dense one
   (``benchmarks/bench_glmd_temperature.py``). ``teacher: cache`` re-tempers the cache instead.
2. **Task stage**: the main job at ``labels.temperature`` from the stage-1 student, on the cache.

Both stages read the same blocks from the one soft-label cache (labeled once, at the task
temperature). Deviation: the seed's task-agnostic stage runs on a general pre-training corpus
and its task stage on the task's data; here both run on the configured corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raykd.config import DistillConfig, PhaseConfig
from raykd.methods import validate
from raykd.report import render_markdown


def agnostic_stage_config(cfg: DistillConfig) -> DistillConfig:
    """The main-job config of the task-agnostic stage: its steps, its temperature over the whole
    stage, and the online teacher (or the cache)."""
    stage = cfg.agnostic_stage
    train = cfg.train.model_copy(update={
        "max_steps": stage.steps,
        "warmup_steps": min(cfg.train.warmup_steps, stage.steps),
        "checkpoint_every": min(cfg.train.checkpoint_every, stage.steps),
        "phases": [PhaseConfig(until=1.0, temperature=stage.temperature)],
        "online_teacher": stage.teacher == "online",
    })
    staged = cfg.model_copy(update={"run_name": f"{cfg.run_name}-agnostic", "agnostic_stage": None,
                                    "train": train})
    return validate(DistillConfig.model_validate(staged.model_dump()))


def task_stage_config(cfg: DistillConfig, student_dir: str | None) -> DistillConfig:
    """The task stage: the main job as configured, from ``student_dir`` (the stage-1 student)."""
    update: dict[str, Any] = {"agnostic_stage": None}
    if student_dir is not None:
        update["student"] = cfg.student.model_copy(update={"init": "pretrained", "model": student_dir})
    return validate(DistillConfig.model_validate(cfg.model_copy(update=update).model_dump()))


def run_glmd(cfg: DistillConfig, output_dir: Path) -> dict[str, Any]:
    """Run GLMD: the task-agnostic stage (if ``cfg.agnostic_stage``), then the task stage.

    Each stage writes a main-job report under ``output_dir/<stage>/``.

    Returns:
        The task stage's report (its students against the teacher on the held-out split), with
        ``stages`` = per stage its temperature, teacher form, steps and students' metrics; also
        written as ``output_dir/report.json``.

    Raises:
        ValueError: a stage config fails validation (both are built before any work) or the
            config has more than one student (the task stage starts from the one stage-1 student).
    """
    # lazy: keeps torch and pyarrow out of import time
    from raykd.recipes.lm.distill import run_distill

    output_dir = Path(output_dir).resolve()
    if cfg.agnostic_stage is None:
        report = run_distill(task_stage_config(cfg, None), output_dir)
        report["method"] = cfg.method
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        return report
    if len(cfg.train.students) != 1:
        raise ValueError(f"method 'glmd' with agnostic_stage trains one student, got {sorted(cfg.train.students)}")
    (name,) = cfg.train.students
    first = agnostic_stage_config(cfg)
    task_stage_config(cfg, str(output_dir))  # the task stage's config is valid too, before any work
    agnostic = run_distill(first, output_dir / "agnostic")
    report = run_distill(task_stage_config(cfg, agnostic[name]["model_dir"]), output_dir / "task")
    report["method"] = cfg.method
    report["stages"] = [
        {"stage": "agnostic", "temperature": cfg.agnostic_stage.temperature, "teacher": cfg.agnostic_stage.teacher,
         "steps": agnostic[name]["steps"], **_metrics(agnostic[name])},
        {"stage": "task", "temperature": cfg.labels.temperature, "teacher": "cache", "steps": report[name]["steps"],
         **_metrics(report[name])},
    ]
    _write(report, output_dir, output_dir / "task")
    return report


def _write(report: dict[str, Any], output_dir: Path, task_dir: Path) -> None:
    """``report.json`` and ``report.md`` (the task stage's table, then one line per stage) and the
    task stage's loss curves in ``output_dir``."""
    import shutil

    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["", "| stage | temperature | teacher | steps | held-out ppl | top-1 agreement | KL(teacher, student) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['temperature']:g} | {s['teacher']} | {s['steps']} | {s['ppl']:.2f} | "
              f"{s['top1_agreement']:.3f} | {s['kl']:.3f} |" for s in report["stages"]]
    (output_dir / "report.md").write_text(render_markdown(report) + "\n".join(lines) + "\n")
    if (task_dir / "loss_curves.png").exists():
        shutil.copy2(task_dir / "loss_curves.png", output_dir / "loss_curves.png")


def _metrics(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("ppl", "top1_agreement", "kl", "model_dir") if k in entry}
