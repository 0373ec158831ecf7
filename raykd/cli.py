"""The ``raykd`` command.

    raykd distill --config jobs/configs/bbc_smollm2.yaml --output-dir runs/demo [key=value ...]
    raykd distill --method annealing_kd --output-dir DIR [key=value ...]   # a method's shipped config
    raykd label   --config ... [key=value ...]     # only build (or find) the soft-label caches
    raykd methods [--verbose]                      # list the distillation methods and losses
    raykd cache verify DIR | repair DIR            # check a soft-label cache; move damaged parts aside
    raykd teacher up serve/teachers.yaml | down <name> | status   # the shared teacher service
    raykd tune minidisc|maxidisc --config tune/configs/minidisc_bbc.yaml --output-dir DIR [key=value ...]
    raykd tune minidisc|maxidisc --config tune/configs/minidisc_smollm2.yaml --output-dir DIR   # task: lm
    raykd tune sweep --minidisc-dir DIR --maxidisc-dir DIR        # lambda sweep against MaxiDisc
    raykd tune kd --config tune/configs/kd_smollm2.yaml --output-dir DIR [key=value ...]   # KD settings, ASHA
    raykd muki --config jobs/configs/muki_bbc.yaml --output-dir DIR [key=value ...]   # MUKI vs KD, UHC, DFA
    raykd mckd --config jobs/configs/mckd_bbc.yaml --output-dir DIR [key=value ...]   # MCKD vs the LLM, vanilla KD
    raykd config --schema distill|mckd|muki|tune|tune-kd|teacher   # JSON schema of a config file, for editors

Each subcommand is a ``main_<name>(config, ...)`` function, so a job script, a test and the
command line call the same code. Every subcommand takes ``--verbose``; exit codes: see :func:`cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from raykd import console
from raykd.cluster import connect
from raykd.config import DistillConfig, default_cache_root
from raykd.console import user_errors
from raykd.methods import available_methods, get_method, load, run_method
from raykd.recipes.lm.kd_search import KDSearchConfig, main_kd_search
from raykd.recipes.mckd.config import MckdConfig
from raykd.recipes.muki.config import MukiConfig
from raykd.recipes.ta_search.config import load_schedule_config
from raykd.report import print_files
from raykd.teacher.service_cli import add_teacher_commands, run_teacher_command


def main_distill(cfg: DistillConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the main job with the recipe of ``cfg.method`` (see :mod:`raykd.methods`)."""
    return run_method(cfg, Path(output_dir))


def main_label(cfg: DistillConfig) -> dict[str, Any]:
    """Find or write the soft-label caches of the train and eval splits; print where they are."""
    # lazy: keeps torch and pyarrow out of import time
    from raykd.soft_labels.plan import Plan, ensure_soft_labels

    plan = Plan(cfg)
    connect(cfg.ray, recorded=not cfg.teacher.start)  # teacher.start=false: the service's cluster
    caches, stats = ensure_soft_labels(plan)
    out = {split: {"path": str(folder), "rows": m.rows, "tokens": m.tokens, "bytes_per_token": round(m.bytes_per_token, 2)}
           for split, (folder, m) in caches.items()}
    out.update(stats)
    print(json.dumps(out, indent=2))
    return out


def main_methods(verbose: bool = False) -> list[tuple[str, str]]:
    """Print every distillation method (one line each, its config file), every loss with the
    target forms it accepts, then the student architectures built from a teacher. ``verbose``
    adds each method's paper and composition."""
    # lazy: keeps torch out of import time
    from raykd.losses import available_losses
    from raykd.students import STUDENT_ARCHITECTURES

    methods = [(m.name, f"{m.description}  [{m.config_path.relative_to(m.config_path.parents[3])}]")
               for m in available_methods().values()]
    losses = [(name, f"[{'/'.join(spec.forms) if spec.forms else ('features' if spec.kind == 'features' else 'no teacher')}] "
                     f"{spec.description}") for name, spec in available_losses().items()]
    family_rows = list(STUDENT_ARCHITECTURES.items())
    width = max(len(n) for n, _ in methods + losses + family_rows)
    for title, rows in (("methods (`method:` in a config; run with raykd distill --config <file>)", methods),
                        ("losses (terms of train.students)", losses),
                        ("student architectures (built from the teacher; trained through the same step)", family_rows)):
        print(title)
        for name, text in rows:
            print(f"  {name:<{width}}  {text}")
            if verbose and title.startswith("methods"):
                m = available_methods()[name]
                print(f"  {'':<{width}}    paper: {m.paper}\n  {'':<{width}}    composes: {m.composes}")
    return methods + losses + family_rows


CONFIGS: dict[str, tuple[str, ...]] = {
    "distill": ("raykd.config:DistillConfig",),
    "mckd": ("raykd.recipes.mckd.config:MckdConfig",),
    "muki": ("raykd.recipes.muki.config:MukiConfig",),
    "tune": ("raykd.recipes.ta_search.config:ClassifierScheduleConfig", "raykd.recipes.ta_search.config:LMScheduleConfig"),
    "tune-kd": ("raykd.recipes.lm.kd_search:KDSearchConfig",),
    "teacher": ("raykd.teacher.service:TeacherServiceConfig",),
}
"""Config file kind -> its top-level model(s) as ``module:Class`` (``tune``: the TA schedule search,
one model per ``task``; ``tune-kd``: ``raykd tune kd``; ``teacher``: ``raykd teacher up``)."""


def config_models(kind: str) -> list[type]:
    """The top-level pydantic model(s) of config kind ``kind`` (a key of :data:`CONFIGS`)."""
    import importlib

    return [getattr(importlib.import_module(m), c) for m, c in (ref.split(":") for ref in CONFIGS[kind])]


def config_schema(kind: str) -> dict[str, Any]:
    """JSON schema of a ``kind`` config file (pydantic's ``model_json_schema``; ``anyOf`` the models
    when a kind has several), with every field's description, type, default and range."""
    from typing import Union

    from pydantic import TypeAdapter

    models = config_models(kind)
    if len(models) == 1:
        schema = models[0].model_json_schema()
    else:
        schema = {"title": f"raykd {kind} config", **TypeAdapter(Union[tuple(models)]).json_schema()}  # noqa: UP007
    return _with_base(schema)


BASE_FIELD = {"type": "string", "title": "Base", "description": (
    "A YAML file this mapping is merged onto (looked up beside this file, then in the working folder; "
    "this mapping's keys win; loops are refused).")}


def _with_base(schema: Any) -> Any:
    """``schema`` with the ``base:`` key (:func:`raykd.config.load_config` reads it on any mapping)
    allowed in every object that lists its properties."""
    if isinstance(schema, dict):
        if isinstance(schema.get("properties"), dict):
            schema["properties"].setdefault("base", dict(BASE_FIELD))
        for value in schema.values():
            _with_base(value)
    elif isinstance(schema, list):
        for value in schema:
            _with_base(value)
    return schema


VERBOSE_HELP = "show everything: Ray's own output, INFO logs and tracebacks (default: progress, results, warnings)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Ray-native knowledge distillation")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("distill", "teacher -> soft-label cache -> students -> report"), ("label", "build or find the soft-label caches")):
        s = sub.add_parser(name, help=help_)
        source = s.add_mutually_exclusive_group()
        source.add_argument("--config", help="YAML config (default: built-in defaults)")
        source.add_argument("--method", help="run a method from its shipped config (`raykd methods` lists them)")
        if name == "distill":
            s.add_argument("--output-dir", required=True, help="where the report, checkpoints and plots go")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    sub.add_parser("methods", help="list distillation methods and losses (--verbose: with papers and compositions)")
    cache = sub.add_parser("cache", help="check a soft-label cache, or move its damaged parts aside")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, help_ in (("verify", "check every shard against the ledger and the manifest"),
                        ("repair", "move damaged parts aside (nothing deleted); the next run relabels only them")):
        csub.add_parser(name, help=help_).add_argument("dir", help="a cache folder, or a labels.cache_dir holding caches")
    add_teacher_commands(sub)
    _add_tune_commands(sub)
    s = sub.add_parser("muki", help="MUKI: integrate teachers of disjoint class subsets (vs vanilla KD, UHC, DFA)")
    s.add_argument("--config", help="YAML config (e.g. jobs/configs/muki_bbc.yaml)")
    s.add_argument("--output-dir", required=True, help="where results.json, results.md and muki.png go")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. student.steps=20")
    s = sub.add_parser("mckd", help="MCKD: multistage collaborative distillation from an LLM's few-shot pseudo-labels")
    s.add_argument("--config", help="YAML config (e.g. jobs/configs/mckd_bbc.yaml)")
    s.add_argument("--output-dir", required=True, help="where results.json, results.md, mckd.png and the stages go")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stages=2")
    s = sub.add_parser("config", help="print the JSON schema of a config file (editors complete and check YAML with it)")
    s.add_argument("--schema", required=True, choices=list(CONFIGS), help="which config: " + ", ".join(CONFIGS))
    _add_verbose(p)
    return p


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """Accept ``--verbose`` after any (sub)command too, e.g. ``raykd distill ... --verbose``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--verbose" not in sub._option_string_actions:
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
                _add_verbose(sub)


def _add_tune_commands(sub) -> None:
    """``raykd tune minidisc|maxidisc|sweep`` (teacher-assistant schedule search, tune/README.md)."""
    tune = sub.add_parser("tune", help="searches on Ray Tune: TA schedules (MiniDisc, MaxiDisc), KD settings")
    tsub = tune.add_subparsers(dest="tune_command", required=True)
    for name, help_ in (("minidisc", "pick the TA in one trial (lambda-tradeoff)"), ("maxidisc", "one Tune trial per candidate TA")):
        s = tsub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (e.g. tune/configs/minidisc_bbc.yaml)")
        s.add_argument("--output-dir", required=True, help="where results.json and the PNG go")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. kd.steps=20")
    s = tsub.add_parser("kd", help="search KD settings (temperature, weights, divergence, k) with ASHA; trials share one cache")
    s.add_argument("--config", required=True, help="YAML config (e.g. tune/configs/kd_smollm2.yaml)")
    s.add_argument("--output-dir", required=True, help="where results.json, results.md and kd_search.png go")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. num_samples=4 distill.train.max_steps=40")
    s = tsub.add_parser("sweep", help="which TA each lambda picks, against the MaxiDisc ground truth")
    s.add_argument("--minidisc-dir", required=True)
    s.add_argument("--maxidisc-dir", required=True)
    s.add_argument("--output-dir", help="where lambda_sweep.json goes (default: the MiniDisc dir)")


def run_tune_command(args: argparse.Namespace) -> int:
    """Dispatch ``raykd tune ...``; returns the exit code."""
    # lazy: keeps torch out of import time
    from raykd.recipes.ta_search import search as schedule_search

    if args.tune_command == "sweep":
        schedule_search.main_sweep(args.minidisc_dir, args.maxidisc_dir, args.output_dir)
        return 0
    if args.tune_command == "kd":
        main_kd_search(load(KDSearchConfig, args.config, args.overrides), args.output_dir)
        return 0
    cfg = load_schedule_config(args.config, args.overrides)  # ``task`` picks the model
    schedule_search.SEARCHES[args.tune_command](cfg, args.output_dir)
    return 0


def main_muki(cfg, output_dir: str | Path) -> dict[str, Any]:
    """``raykd muki``: :func:`raykd.recipes.muki.run.main_muki` on a
    :class:`~raykd.recipes.muki.config.MukiConfig`. Bad partitions, teacher labels or head sizes
    are user errors, raised before any training."""
    # lazy: keeps pyarrow out of import time
    from raykd.recipes.muki.prepare import check_plan
    from raykd.recipes.muki.run import main_muki as run_muki

    with user_errors(ValueError, FileNotFoundError):
        from raykd.data.bbc import load_bbc_news

        check_plan(cfg, sorted({d.label for d in load_bbc_news() if d.label is not None}))
    return run_muki(cfg, output_dir)


def main_mckd(cfg, output_dir: str | Path) -> dict[str, Any]:
    """``raykd mckd``: :func:`raykd.recipes.mckd.run.main_mckd` on a
    :class:`~raykd.recipes.mckd.config.MckdConfig`. Bad input (gold examples, verbalisers, halves,
    the student's labels) is a user error, raised before any LLM call."""
    # lazy: keeps pyarrow out of import time
    from raykd.recipes.mckd.run import main_mckd as run_mckd

    return run_mckd(cfg, output_dir)


def main_cache(command: str, location: str) -> int:
    """``raykd cache verify|repair DIR`` (:mod:`raykd.soft_labels.repair`): one line per cache and
    per problem. ``verify`` returns 0 when nothing needs repair, else raises a user error naming
    ``repair``; ``repair`` moves what is bad aside and returns 0.

    Raises:
        raykd.soft_labels.cache.CacheError: no cache at ``location``; ``verify`` found damage.
    """
    # lazy: keeps pyarrow out of import time
    from raykd.soft_labels.cache import CacheError
    from raykd.soft_labels.repair import cache_folders, repair_cache, verify_cache

    checks = [verify_cache(folder) for folder in cache_folders(location)]
    for c in checks:
        state = "finished" if c.finished else "unfinished (no manifest.json; the next run labels the missing parts)"
        print(f"{c.cache_dir}: {c.parts} committed part(s), {state}")
        for why in (*c.damaged.values(), *c.manifest, *(f"stray file {f}" for f in c.stray)):
            print(f"  {why}")
        for source, target in repair_cache(c) if command == "repair" else ():
            print(f"  moved {source} -> {target}")
    bad = [c for c in checks if not c.ok]
    if command == "verify" and bad:
        parts = sum(len(c.damaged) for c in bad)
        raise CacheError(f"{parts} damaged part(s) in {len(bad)} of {len(checks)} cache(s): run `raykd cache repair "
                         f"{location}` (it moves them aside, deleting nothing), then the labeling command again")
    if command == "repair":
        print("nothing to repair" if not bad else "done: run the same labeling or distill command again; it relabels "
              "only the parts moved aside")
    return 0


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "cache":
        return main_cache(args.cache_command, args.dir)
    if args.command == "mckd":
        main_mckd(load(MckdConfig, args.config, args.overrides), args.output_dir)
        return 0
    if args.command == "muki":
        main_muki(load(MukiConfig, args.config, args.overrides), args.output_dir)
        return 0
    if args.command == "teacher":
        return run_teacher_command(args)
    if args.command == "tune":
        return run_tune_command(args)
    if args.command == "config":
        print(json.dumps(config_schema(args.schema), indent=2))
        return 0
    if args.command == "methods":
        main_methods(args.verbose)
        return 0
    config = args.config
    if args.method:
        config = get_method(args.method).config_path
    cfg = load(DistillConfig, config, args.overrides)
    if args.command == "label":
        main_label(cfg)
        return 0
    print_files(main_distill(cfg, args.output_dir), Path(args.output_dir))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code.

    0: done; 2: a user error (``error: <what and how to fix>`` on stderr, no traceback); 1: any
    other error. ``--verbose`` shows Ray's own output, INFO logs and tracebacks on the console;
    without it they go to ``<output-dir>/logs/`` (see :mod:`raykd.console`).
    """
    args = _parser().parse_args(argv)
    output_dir = getattr(args, "output_dir", None)
    remote = output_dir if output_dir and _on_object_storage(output_dir) else None
    if remote:  # the run writes into a local staging folder, uploaded to the URI when the command ends
        args.output_dir = output_dir = str(_staging_dir(remote))
    log_dir = Path(output_dir) / "logs" if output_dir else None

    def command() -> int:
        if remote:
            # lazy: keeps pyarrow out of import time
            from raykd import storage

            with console.user_errors(ValueError):
                storage.check(remote, setting="--output-dir")  # a bad URI fails before any work
        return _run_command(args)

    code = console.run(command, verbose=args.verbose, log_dir=log_dir)
    if remote and Path(output_dir).exists():
        code = _upload_run(Path(output_dir), remote) or code
    return code


def _on_object_storage(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _staging_dir(uri: str) -> Path:
    """The local folder a run for output URI ``uri`` writes into (the same for a rerun, so Ray
    Train resumes from its checkpoints)."""
    import hashlib

    return default_cache_root() / "runs" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _upload_run(folder: Path, uri: str) -> int:
    """Copy the run folder to ``uri`` (pyarrow.fs); 0 on success, 1 (with ``error: ...``) on failure."""
    # lazy: keeps pyarrow out of import time
    import pyarrow.fs

    from raykd import storage

    try:
        fs, path = storage.resolve(uri, setting="--output-dir")
        pyarrow.fs.copy_files(str(folder), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    except Exception as e:  # noqa: BLE001  (the run itself is done; say where its files are)
        print(f"error: could not upload the run folder to {uri} ({e}); it is in {folder}", file=sys.stderr)
        return 1
    print(f"run folder uploaded to {uri} (local copy: {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
