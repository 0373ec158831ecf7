"""``raykd teacher up|down|status|env|stop-cluster``: the command line of the teacher service
(:mod:`raykd.teacher.service`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from raykd import console
from raykd.cluster import ClusterError, stop_owned_cluster
from raykd.config import load_config
from raykd.teacher.service import TeacherServiceConfig, teacher_down, teacher_env, teacher_status, teacher_up


def add_teacher_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``teacher up|down|status|env|stop-cluster`` to the ``raykd`` command's subparsers."""
    p = subparsers.add_parser("teacher", help="run named teachers as a shared service (up / down / status / env)")
    sub = p.add_subparsers(dest="teacher_command", required=True)
    up = sub.add_parser("up", help="start the teachers of a service config (running ones are kept)")
    up.add_argument("config", help="service YAML, e.g. serve/teachers.yaml")
    up.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. proxy.port=8001")
    down = sub.add_parser("down", help="delete a running teacher that raykd deployed")
    down.add_argument("name")
    for s in (up, sub.add_parser("status", help="list running teachers")):
        s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("env", help="print `export` lines for raykd's own cluster (eval \"$(raykd teacher env)\")")
    sub.add_parser("stop-cluster", help="stop raykd's own cluster and every teacher on it")
    return p


def _print_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for line in [list(columns)] + cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())


def run_teacher_command(args: argparse.Namespace) -> int:
    """Run a parsed ``raykd teacher ...`` command; returns the exit code (2: a bad config, an
    unknown teacher, a model not found or a Serve setup to change: ``error: ...`` on stderr)."""
    return console.run(lambda: _teacher_command(args))


def _teacher_command(args: argparse.Namespace) -> None:
    # Each raises ValueError / RuntimeError / FileNotFoundError for input to fix (see their docstrings).
    with console.user_errors(ValueError, RuntimeError, FileNotFoundError, ClusterError):
        if args.teacher_command == "up":
            out = teacher_up(load_config(TeacherServiceConfig, args.config, args.overrides))
            if args.json:
                print(json.dumps(out, indent=2))
            else:
                _print_table(out["teachers"], ("name", "started", "url"))
                _print_cluster(out["address"], out["cluster"])
        elif args.teacher_command == "down":
            teacher_down(args.name)
            print(f"teacher {args.name!r} stopped")
        elif args.teacher_command == "env":
            print("\n".join(f"export {k}={v}" for k, v in teacher_env().items()))
        elif args.teacher_command == "stop-cluster":
            _stop_cluster()
        else:
            _status_command(args.json)


def _print_cluster(address: str, cluster: dict[str, Any] | None) -> None:
    where = f"raykd's own cluster (dashboard {cluster['dashboard']})" if cluster else "the named cluster"
    print(f"cluster: {address}, {where}")
    if cluster:
        print('jobs and runs use it after: eval "$(raykd teacher env)"  (or ray.address=raykd)')


def _status_command(as_json: bool) -> None:
    import ray

    rows = teacher_status()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if rows:
        _print_table(rows, ("name", "status", "replicas", "url", "weights_fingerprint"))
    else:
        print("no teachers running")
    if ray.is_initialized():
        print(f"cluster: {ray.get_runtime_context().gcs_address}")


def _stop_cluster() -> None:
    record = stop_owned_cluster()
    print(f"stopped raykd's cluster at {record.gcs_address}" if record else "no raykd cluster is recorded")
