"""Teacher-assistant chains: TAKD and DGKD.

- **TAKD** (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant", AAAI):
  teacher -> TA_1 -> ... -> student. Each stage is a main-job run whose student becomes the next
  stage's teacher: it is exported as a model folder and *served* as a teacher like any other (its
  own Serve deployment, its own soft-label cache keyed by its own weights fingerprint).
- **DGKD** (Son et al. 2021, "Densely Guided Knowledge Distillation using Multiple Teacher
  Assistants", ICCV): every earlier model teaches each later one; a stage's teachers are the
  teacher and all earlier TAs, their soft labels joined by row and averaged (for forward KL,
  averaging the teachers' losses and distilling to the averaged distribution give the same
  gradient). The paper's random dropping of teachers per step is not implemented.

Every student of the chain is a layer-dropped copy of the *original* teacher (the same start as a
directly distilled student, so chains and direct KD compare fairly). The chain report evaluates
the final student against the original teacher's held-out soft labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raykd.config import DistillConfig, TeacherConfig
from raykd.methods import run_method, validate


def _stage_config(cfg: DistillConfig, *, index: int, name: str, keep_layers: list[int], teachers: list[TeacherConfig],
                  students: dict[str, dict[str, float]], max_steps: int | None) -> DistillConfig:
    """The main-job config of one stage: its teachers, a layer-dropped copy of the original teacher."""
    staged = cfg.model_copy(update={
        "run_name": f"{cfg.run_name}-{name}",
        "method": "tmkd" if len(teachers) > 1 else "kd",
        "chain": None,
        "teacher": teachers[0],
        "extra_teachers": teachers[1:],
        "student": cfg.student.model_copy(update={"keep_layers": keep_layers, "model": cfg.student.model or cfg.teacher.model}),
        "train": cfg.train.model_copy(update={"students": students, "max_steps": max_steps or cfg.train.max_steps,
                                              "seed": cfg.train.seed + index}),
    })
    return validate(DistillConfig.model_validate(staged.model_dump()))


def _served(cfg: DistillConfig, name: str, model_dir: str) -> TeacherConfig:
    """A trained stage student as a teacher: same serving settings, its own name and folder."""
    return cfg.teacher.model_copy(update={"name": f"{cfg.run_name}-{name}", "model": model_dir, "keep_alive": False})


def run_takd(cfg: DistillConfig, output_dir: Path) -> dict[str, Any]:
    """Run a TAKD (``method: takd``) or DGKD (``method: dgkd``) chain.

    Stages: one per ``chain.assistants`` entry (TA ``i`` keeps ``keep_layers`` of the teacher and
    trains with the objective of the config's first student), then the final stage with every
    ``train.students`` entry. Each stage writes a main-job report under ``output_dir/<stage>/``.

    Returns:
        The chain report (also ``output_dir/report.json``): per stage its teachers, students and
        metrics, and ``final`` = each final student's held-out perplexity and top-1 agreement
        against the *original* teacher.

    Raises:
        ValueError: no ``chain`` section, or a stage config fails validation (before any work).
    """
    # lazy: keeps torch and pyarrow out of import time
    from raykd.train.evaluate import evaluate_folder

    if cfg.chain is None:
        raise ValueError(f"method {cfg.method!r} needs a `chain:` section with its teacher assistants")
    dense = cfg.method == "dgkd"
    output_dir = Path(output_dir).resolve()
    first_objective = next(iter(cfg.train.students.values()))
    teachers, stages = [cfg.teacher], []
    plan: list[tuple[str, DistillConfig]] = []
    for i, ta in enumerate(cfg.chain.assistants, start=1):  # validate every TA stage first
        stage_teachers = teachers if dense else teachers[-1:]
        name = f"ta{i}"
        plan.append((name, _stage_config(cfg, index=i, name=name, keep_layers=ta.keep_layers, teachers=list(stage_teachers),
                                         students={name: first_objective}, max_steps=ta.max_steps)))
        teachers = [*teachers, _served(cfg, name, str(output_dir / name / "students" / name))]
    original_eval, teacher_metrics = None, None
    for name, stage_cfg in plan:
        report = run_distill_stage(stage_cfg, output_dir / name)
        stages.append({"stage": name, "teachers": [t.model for t in (stage_cfg.teacher, *stage_cfg.extra_teachers)],
                       "keep_layers": stage_cfg.student.keep_layers, name: _metrics(report[name])})
        if original_eval is None:  # the first stage is labeled by the original teacher
            original_eval, teacher_metrics = _eval_files(report), report["teacher"]
    final_teachers = teachers if dense else teachers[-1:]
    final_cfg = _stage_config(cfg, index=0, name="student", keep_layers=cfg.student.keep_layers,
                              teachers=list(final_teachers), students=cfg.train.students, max_steps=None)
    report = run_distill_stage(final_cfg, output_dir / "student")
    stages.append({"stage": "student", "teachers": [t.model for t in final_teachers],
                   "keep_layers": cfg.student.keep_layers, **{s: _metrics(report[s]) for s in cfg.train.students}})
    if original_eval is None:
        original_eval, teacher_metrics = _eval_files(report), report["teacher"]
    final = {s: {**evaluate_folder(Path(report[s]["model_dir"]), original_eval, cfg.eval.batch_size), "params": report[s]["params"]}
             for s in cfg.train.students}
    chain_report = {"run_name": cfg.run_name, "method": cfg.method, "teacher": teacher_metrics, "stages": stages,
                    "final_vs_original_teacher": final}
    (output_dir / "report.json").write_text(json.dumps(chain_report, indent=2))
    _print_chain(chain_report)
    return chain_report


def run_distill_stage(cfg: DistillConfig, output_dir: Path) -> dict[str, Any]:
    """One stage: the main job with the stage's method (``kd`` or ``tmkd``)."""
    return run_method(cfg, output_dir)


def _eval_files(report: dict[str, Any]) -> list[str]:
    # lazy: keeps pyarrow out of import time
    from raykd.soft_labels.cache import open_cache, shard_paths

    folder = report["cache"]["eval_path"]
    return shard_paths(folder, open_cache(folder))


def _metrics(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("ppl", "top1_agreement", "params", "steps", "model_dir") if k in entry}


def _print_chain(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['method']} chain: final students against the original teacher (held out)")
    for col in ("student", "params", "ppl", "top-1 agreement"):
        table.add_column(col, justify="right")
    for name, m in report["final_vs_original_teacher"].items():
        table.add_row(name, f"{m['params']:,}", f"{m['ppl']:.2f}", f"{m['top1_agreement']:.3f}")
    Console().print(table)
