"""The ``raykd`` command.

    raykd distill --config jobs/configs/bbc_smollm2.yaml --output-dir runs/demo [key=value ...]
    raykd label   --config ... [key=value ...]     # only build (or find) the soft-label caches
    raykd methods [--verbose]                      # list the distillation methods and losses
    raykd teacher up serve/teachers.yaml | down <name> | status   # the shared teacher service
    raykd tune minidisc|maxidisc --config tune/configs/minidisc_bbc.yaml --output-dir DIR [key=value ...]
    raykd tune sweep --minidisc-dir DIR --maxidisc-dir DIR        # lambda sweep against MaxiDisc

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
    """Run the main job with the recipe of ``cfg.method`` (see :mod:`raykd.methods`)."""
    from raykd.methods import run_method

    return run_method(cfg, Path(output_dir))


def main_label(cfg: DistillConfig) -> dict[str, Any]:
    """Find or write the soft-label caches of the train and eval splits; print where they are."""
    from raykd.cluster import connect
    from raykd.soft_labels.plan import Plan, ensure_soft_labels

    plan = Plan(cfg)
    connect(cfg.ray)
    caches, stats = ensure_soft_labels(plan)
    out = {split: {"path": str(folder), "rows": m.rows, "tokens": m.tokens, "bytes_per_token": round(m.bytes_per_token, 2)}
           for split, (folder, m) in caches.items()}
    out.update(stats)
    print(json.dumps(out, indent=2))
    return out


def main_methods(verbose: bool = False) -> list[tuple[str, str]]:
    """Print every distillation method (one line each, its config file), then every loss with
    the target forms it accepts. ``verbose`` adds each method's paper and composition."""
    from raykd.losses import available_losses
    from raykd.methods import available_methods

    methods = [(m.name, f"{m.description}  [{m.config_path.relative_to(m.config_path.parents[3])}]")
               for m in available_methods().values()]
    losses = [(name, f"[{'/'.join(spec.forms) if spec.forms else 'no teacher'}] {spec.description}")
              for name, spec in available_losses().items()]
    width = max(len(n) for n, _ in methods + losses)
    for title, rows in (("methods (`method:` in a config; run with raykd distill --config <file>)", methods),
                        ("losses (terms of train.students)", losses)):
        print(title)
        for name, text in rows:
            print(f"  {name:<{width}}  {text}")
            if verbose and title.startswith("methods"):
                m = available_methods()[name]
                print(f"  {'':<{width}}    paper: {m.paper}\n  {'':<{width}}    composes: {m.composes}")
    return methods + losses


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Ray-native knowledge distillation")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("distill", "teacher -> soft-label cache -> students -> report"), ("label", "build or find the soft-label caches")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (default: built-in defaults)")
        if name == "distill":
            s.add_argument("--output-dir", required=True, help="where the report, checkpoints and plots go")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    sub.add_parser("methods", help="list distillation methods and losses").add_argument(
        "--verbose", action="store_true", help="also show each method's paper and how it composes")
    add_teacher_commands(sub)
    _add_tune_commands(sub)
    return p


def _add_tune_commands(sub) -> None:
    """``raykd tune minidisc|maxidisc|sweep`` (teacher-assistant schedule search, tune/README.md)."""
    tune = sub.add_parser("tune", help="teacher-assistant schedule search on Ray Tune (MiniDisc, MaxiDisc)")
    tsub = tune.add_subparsers(dest="tune_command", required=True)
    for name, help_ in (("minidisc", "pick the TA in one trial (lambda-tradeoff)"), ("maxidisc", "one Tune trial per candidate TA")):
        s = tsub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (e.g. tune/configs/minidisc_bbc.yaml)")
        s.add_argument("--output-dir", required=True, help="where results.json and the PNG go")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. kd.steps=20")
    s = tsub.add_parser("sweep", help="which TA each lambda picks, against the MaxiDisc ground truth")
    s.add_argument("--minidisc-dir", required=True)
    s.add_argument("--maxidisc-dir", required=True)
    s.add_argument("--output-dir", help="where lambda_sweep.json goes (default: the MiniDisc dir)")


def _config_error(e: ConfigError) -> int:
    print(f"raykd: {e}", file=sys.stderr)
    return 2


def run_tune_command(args: argparse.Namespace) -> int:
    """Dispatch ``raykd tune ...``; returns the exit code (2 for a bad config)."""
    from raykd.recipes.ta_search import search as schedule_search
    from raykd.recipes.ta_search.config import ScheduleConfig

    if args.tune_command == "sweep":
        schedule_search.main_sweep(args.minidisc_dir, args.maxidisc_dir, args.output_dir)
        return 0
    try:
        cfg = load_config(ScheduleConfig, args.config, args.overrides)
    except ConfigError as e:
        return _config_error(e)
    main = schedule_search.main_minidisc if args.tune_command == "minidisc" else schedule_search.main_maxidisc
    main(cfg, args.output_dir)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "teacher":
        return run_teacher_command(args)
    if args.command == "tune":
        return run_tune_command(args)
    if args.command == "methods":
        main_methods(args.verbose)
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
