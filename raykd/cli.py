"""The ``raykd`` command.

    raykd distill --config jobs/configs/bbc_smollm2.yaml --output-dir runs/demo [key=value ...]
    raykd label   --config ... [key=value ...]     # only build (or find) the soft-label caches
    raykd methods                                  # list the registered distillation losses
    raykd teacher up serve/teachers.yaml | down <name> | status   # the shared teacher service

Each subcommand is a ``main_<name>(config, ...)`` function, so a job script, a test and the
command line call the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from raykd.config import ConfigError, DistillConfig, load_config
from raykd.teacher.service import add_teacher_commands, run_teacher_command


def main_distill(cfg: DistillConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the main job (see :mod:`raykd.recipes.distill`)."""
    from raykd.recipes.distill import run_distill

    return run_distill(cfg, Path(output_dir))


def main_label(cfg: DistillConfig) -> dict[str, Any]:
    """Find or write the soft-label caches of the train and eval splits; print where they are."""
    from raykd.cluster import connect
    from raykd.recipes.distill import Plan, ensure_soft_labels

    plan = Plan(cfg)
    connect(cfg.ray)
    caches, stats = ensure_soft_labels(plan)
    out = {split: {"path": str(folder), "rows": m.rows, "tokens": m.tokens, "bytes_per_token": round(m.bytes_per_token, 2)}
           for split, (folder, m) in caches.items()}
    out.update(stats)
    print(json.dumps(out, indent=2))
    return out


def main_methods() -> list[tuple[str, str]]:
    """Print every registered loss with the target forms it accepts and a one-line description."""
    from raykd.losses import available_losses

    rows = []
    for name, spec in sorted(available_losses().items()):
        forms = "/".join(spec.forms) if spec.forms else "no teacher"
        rows.append((name, f"[{forms}] {spec.description}"))
    width = max(len(n) for n, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Ray-native knowledge distillation")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("distill", "teacher -> soft-label cache -> students -> report"), ("label", "build or find the soft-label caches")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (default: built-in defaults)")
        if name == "distill":
            s.add_argument("--output-dir", required=True, help="where the report, checkpoints and plots go")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    sub.add_parser("methods", help="list distillation losses")
    add_teacher_commands(sub)
    return p


def cli(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "teacher":
        return run_teacher_command(args)
    if args.command == "methods":
        main_methods()
        return 0
    try:
        cfg = load_config(DistillConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"raykd: {e}", file=sys.stderr)
        return 2
    if args.command == "distill":
        main_distill(cfg, args.output_dir)
    else:
        main_label(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
