"""A long-lived multi-teacher service: named teachers on a Ray cluster, shared by many runs.

    raykd teacher up serve/teachers.yaml [key=value ...]   # start (or keep) every teacher
    raykd teacher status [--json]                          # name, status, replicas, fingerprints
    raykd teacher down <name>                              # delete one teacher

Each teacher is its own Serve application, named by ``TeacherConfig.name``, with its own
replicas and optionally an HTTP API in front (:mod:`raykd.teacher.http`). Serve applications
belong to the cluster, not to the process that started them, so they keep serving after
``teacher up`` exits; a student run with ``teacher.name=<name>`` finds and reuses the running
teacher (:func:`raykd.teacher.deployment.start_teacher`) instead of loading its own.

The config models here are plain data; Ray is imported only by the functions that use it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from raykd import console
from raykd.config import RayConfig, Strict, TeacherAutoscalingConfig, TeacherConfig, check_custom_resources, load_config
from raykd.teacher.schemas import HTTPConfig

log = logging.getLogger(__name__)


class ProxyConfig(Strict):
    """Where Serve's HTTP proxy listens (one per cluster, shared by every teacher)."""

    host: str = "127.0.0.1"
    """Interface to bind; ``0.0.0.0`` exposes the teachers beyond this machine (set a token)."""
    port: int = Field(default=8000, ge=1, le=65535)


class ServedTeacher(Strict):
    """One teacher of the service and how it is served."""

    teacher: TeacherConfig
    """The model and its replicas (``name`` is the Serve application name)."""
    autoscaling: TeacherAutoscalingConfig | None = None
    """The same setting as ``teacher.autoscaling`` (set it in one of the two places): Serve's
    ``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...);
    replaces ``teacher.num_replicas`` when set."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each replica reserves besides its CPUs/GPUs, to place the teacher on
    chosen nodes: ``{teacher_node: 1}`` runs it only on nodes started with
    ``ray start --resources='{"teacher_node": 4}'`` (at most 4 replicas there)."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests one teacher replica accepts at once. They wait in the replica's fair batching
    queue, which merges them into batches (``teacher.max_batch_tokens``) shared round robin
    between callers; keep it at least the number of requests all callers keep in flight, or
    the excess waits in Serve's first-come queue, outside the fair share."""
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests each caller (the HTTP ingress, a student's handle) queues before the next is
    refused (HTTP 503, ``BackPressureError`` on a handle); -1: unbounded."""
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    """The HTTP API of this teacher (``http.enabled=false``: handle access only)."""

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v, "teacher.num_cpus / teacher.num_gpus")

    @model_validator(mode="after")
    def _autoscaling_once(self) -> ServedTeacher:
        if self.autoscaling is not None and self.teacher.autoscaling is not None:
            raise ValueError(f"teacher {self.teacher.name!r}: autoscaling is set twice (autoscaling and "
                             "teacher.autoscaling); keep teacher.autoscaling only")
        return self

    @property
    def teacher_config(self) -> TeacherConfig:
        """``teacher`` with ``autoscaling`` folded in (the one config the deployment is built from)."""
        if self.autoscaling is None:
            return self.teacher
        return self.teacher.model_copy(update={"autoscaling": self.autoscaling})

    @property
    def route_prefix(self) -> str | None:
        """HTTP prefix of this teacher's routes, None when HTTP is off."""
        if not self.http.enabled:
            return None
        return self.http.route_prefix or f"/teachers/{self.teacher.name}"


class TeacherServiceConfig(Strict):
    """``raykd teacher up``: the teachers to run on a cluster and how to reach them."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Cluster to use; with no address a running local cluster is joined, else one is started
    (``ray start --head``) so the teachers outlive the command."""
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    teachers: list[ServedTeacher] = Field(min_length=1)
    """One entry per named teacher."""

    @model_validator(mode="after")
    def _unique(self) -> TeacherServiceConfig:
        names = [t.teacher.name for t in self.teachers]
        prefixes = [t.route_prefix for t in self.teachers if t.route_prefix]
        for what, values in (("teacher.name", names), ("http.route_prefix", prefixes)):
            if len(set(values)) != len(values):
                raise ValueError(f"teachers: each {what} must be unique, got {values}")
        for t in self.teachers:
            if t.http.enabled and t.http.route_prefix is None and not re.fullmatch(r"[A-Za-z0-9._-]+", t.teacher.name):
                raise ValueError(f"teacher name {t.teacher.name!r} cannot be a URL path part: set http.route_prefix")
        return self


def served_teacher_app(served: ServedTeacher, model_path: str):
    """Bind one teacher application: the teacher deployment, behind an HTTP ingress if enabled.

    The bearer token is resolved here, in the calling process: ``http.token``, else the
    environment variable ``http.token_env``.

    Returns:
        a ``serve.Application`` (not yet running).
    """
    from raykd.teacher.deployment import teacher_app
    from raykd.teacher.http import HTTPIngress

    t = served.teacher_config
    options: dict[str, Any] = {
        "max_ongoing_requests": served.max_ongoing_requests,
        "max_queued_requests": served.max_queued_requests,
        **placement_options(served),
    }
    node = teacher_app(t, model_path, **options)
    if not served.http.enabled:
        return node
    http = served.http
    token = http.token or (os.environ.get(http.token_env) if http.token_env else None) or None
    if token is None and not http.tokens:
        log.warning("teacher %r is served over HTTP without a token: anyone who reaches the proxy can use it", t.name)
    tokens = [c.model_copy(update={"token": c.token or os.environ.get(c.token_env or "")}) for c in http.tokens]
    for c in tokens:
        if not c.token:
            raise ValueError(f"teacher {t.name!r}: token {c.name!r} reads ${c.token_env}, which is not set in this shell")
    http = http.model_copy(update={"token": token, "tokens": tokens, "max_batch_size": http.max_batch_size or t.max_batch_size})
    ingress = HTTPIngress.options(max_ongoing_requests=http.max_ongoing_requests, max_queued_requests=http.max_queued_requests)
    return ingress.bind(node, http)


def placement_options(served: ServedTeacher) -> dict[str, Any]:
    """Serve ``Deployment.options`` that add ``served.resources`` to each replica (empty when there
    are none): to the replica actor, and with tensor/pipeline parallelism also to the replica's own
    (first) placement-group bundle, which the actor runs in (pure: starts nothing)."""
    from raykd.teacher.deployment import deployment_options

    if not served.resources:
        return {}
    base = deployment_options(served.teacher_config)
    out: dict[str, Any] = {"ray_actor_options": {**base["ray_actor_options"], "resources": dict(served.resources)}}
    if "placement_group_bundles" in base:
        first, *rest = base["placement_group_bundles"]
        out["placement_group_bundles"] = [{**first, **served.resources}, *rest]
    return out


def _replica_resources(served: ServedTeacher) -> dict[str, float]:
    """Resources one replica needs on a single node: its CPUs, GPUs and ``resources``."""
    t = served.teacher_config
    need = {"CPU": t.num_cpus, "GPU": t.gpus_per_replica, **served.resources}
    return {r: n for r, n in need.items() if n > 0}


def check_placeable(served: ServedTeacher, nodes: list[dict[str, float]]) -> None:
    """Refuse a teacher no node of the cluster can ever hold, before any model loads (a replica
    that fits nowhere would wait for resources forever).

    Args:
        served: the teacher and its placement (``teacher.num_cpus``/``num_gpus``, ``resources``).
        nodes: total resources of each alive node (e.g. ``[n["Resources"] for n in ray.nodes()]``).

    Raises:
        ValueError: as :func:`raykd.teacher.deployment.check_cluster_resources` (GPUs), or no
            single node has every resource one replica needs (the message lists the nodes).
    """
    from raykd.teacher.deployment import check_cluster_resources

    t = served.teacher_config
    check_cluster_resources(t, [float(n.get("GPU", 0.0)) for n in nodes])
    need = _replica_resources(served)
    if any(all(n.get(r, 0.0) + 1e-9 >= amount for r, amount in need.items()) for n in nodes):
        return
    have = "; ".join(f"node {i}: " + ", ".join(f"{r}={n.get(r, 0.0):g}" for r in need) for i, n in enumerate(nodes))
    custom = json.dumps(served.resources) if served.resources else "{...}"
    raise ValueError(f"teacher {t.name!r}: one replica needs {need} on one node, but no node has all of it "
                     f"({have or 'no alive nodes'}). Add such a node (`ray start --address=... --resources='{custom}'`), "
                     "or lower teacher.num_cpus / num_gpus or the teacher's `resources`")


def _connect(ray_cfg: RayConfig | None, *, start: bool) -> bool:
    """Join the cluster (``ray.address``, ``$RAY_ADDRESS`` or a running local one).

    With ``start``, a missing local cluster is started with ``ray start --head`` so it outlives
    this process; it runs this process's Python environment, also for jobs submitted to it
    (:func:`raykd.cluster.start_node`). Returns False when there is no cluster to join and
    ``start`` is False.
    """
    import ray

    from raykd.cluster import start_node

    if ray.is_initialized():
        return True
    address = (ray_cfg.address if ray_cfg else None) or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address or "auto", log_to_driver=False)
        return True
    except ConnectionError:
        if address:  # a named cluster that cannot be reached is an error, not a reason to start one
            raise
        if not start:
            return False
    args = ["--head", *([f"--num-cpus={ray_cfg.num_cpus}"] if ray_cfg and ray_cfg.num_cpus else [])]
    log.info("no Ray cluster running: starting one with `ray start %s` (`ray stop` stops it)", " ".join(args))
    start_node(*args)
    ray.init(address="auto", log_to_driver=False)
    return True


def _serve_details():
    """Serve's view of the cluster (what ``serve.status()`` is built from), None if Serve is off."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else ServeInstanceDetails(**client.get_serve_details())


def _teacher_apps(details) -> dict[str, Any]:
    from raykd.teacher.deployment import DEPLOYMENT_NAME

    apps = details.applications if details is not None else {}
    return {name: app for name, app in sorted(apps.items()) if DEPLOYMENT_NAME in app.deployments}


def _base_url(details) -> str | None:
    opts = details.http_options if details is not None else None
    if opts is None or str(getattr(details.proxy_location, "value", details.proxy_location)) == "Disabled":
        return None
    return f"http://{opts.host}:{opts.port}"


def teacher_up(cfg: TeacherServiceConfig) -> dict[str, Any]:
    """Start every teacher of ``cfg`` that is not running yet; leave running ones as they are.

    Returns:
        ``{"address": <GCS address>, "teachers": [{"name", "started", "url"}, ...]}``;
        ``url`` is the teacher's HTTP base URL (None when HTTP is off).

    Raises:
        RuntimeError: HTTP is wanted but Serve already runs on this cluster without a proxy
            (started by a run with HTTP off): ``serve shutdown`` first, or turn HTTP off.
        FileNotFoundError: a teacher model cannot be found (from ``resolve_model_path``).
        ValueError: no node of the cluster can hold a replica of a teacher to start (see
            :func:`check_placeable`); nothing is deployed then.
    """
    import ray
    from ray import serve

    from raykd.models import resolve_model_path
    from raykd.teacher.deployment import running_teacher

    _connect(cfg.ray, start=True)
    new = [t for t in cfg.teachers if running_teacher(t.teacher.name) is None]
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for t in new:  # every teacher to start is checked before the first one deploys
        check_placeable(t, nodes)
    want_http = any(t.http.enabled for t in cfg.teachers)
    serve.start(proxy_location="HeadOnly" if want_http else "Disabled", http_options=cfg.proxy.model_dump())
    base = _base_url(_serve_details())
    if want_http and base is None:
        raise RuntimeError("Serve already runs on this cluster without an HTTP proxy; run `serve shutdown` "
                           "(stops every Serve app) and retry, or set http.enabled=false for each teacher")
    if want_http and base != f"http://{cfg.proxy.host}:{cfg.proxy.port}":
        log.warning("Serve's HTTP proxy already listens on %s; the proxy settings of this config are ignored", base)
    # Find every model before deploying any, so a typo fails before the first teacher loads.
    apps = {t.teacher.name: served_teacher_app(t, str(resolve_model_path(t.teacher.model))) for t in new}
    for t in new:
        serve.run(apps[t.teacher.name], name=t.teacher.name, route_prefix=t.route_prefix, blocking=False)
    running = _teacher_apps(_serve_details())
    out = []
    for t in cfg.teachers:
        name = t.teacher.name
        if name not in apps:
            log.info("teacher %r is already running: left as it is (`raykd teacher down %s` to replace it)", name, name)
        prefix = running[name].route_prefix if name in running else None
        out.append({"name": name, "started": name in apps, "url": f"{base}{prefix}" if base and prefix else None})
    return {"address": ray.get_runtime_context().gcs_address, "teachers": out}


def teacher_status() -> list[dict[str, Any]]:
    """The teachers running on the cluster (empty when there is no cluster or no Serve).

    Returns:
        One dict per teacher: ``name``, ``status`` (Serve's application status), ``replicas``
        (running), ``url`` (HTTP base URL or None), and for running teachers
        ``weights_fingerprint``, ``tokenizer_fingerprint``, ``vocab_size``, ``calls``.
    """
    from ray import serve

    from raykd.teacher.deployment import DEPLOYMENT_NAME

    if not _connect(None, start=False):
        return []
    details = _serve_details()
    base = _base_url(details)
    rows = []
    for name, app in _teacher_apps(details).items():
        dep = app.deployments[DEPLOYMENT_NAME]
        status = str(getattr(app.status, "value", app.status))
        row: dict[str, Any] = {
            "name": name,
            "status": status,
            "replicas": sum(str(getattr(r.state, "value", r.state)) == "RUNNING" for r in dep.replicas),
            "url": f"{base}{app.route_prefix}" if base and app.route_prefix else None,
        }
        if status == "RUNNING":
            try:
                info = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=name).info.remote().result(timeout_s=30)
                row.update({k: info[k] for k in ("weights_fingerprint", "tokenizer_fingerprint", "vocab_size", "calls")})
            except Exception as e:  # noqa: BLE001 - busy or failing teacher: report, do not fail
                row["message"] = f"info unavailable: {type(e).__name__}"
        rows.append(row)
    return rows


def teacher_down(name: str) -> None:
    """Delete the running teacher application ``name`` (its replicas and HTTP routes).

    Raises:
        ValueError: no teacher of that name runs (the message lists the running ones).
    """
    from ray import serve

    running = list(_teacher_apps(_serve_details())) if _connect(None, start=False) else []
    if name not in running:
        raise ValueError(f"no teacher named {name!r} is running; running teachers: {', '.join(running) or 'none'}")
    serve.delete(name)


def add_teacher_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``teacher up|down|status`` to the ``raykd`` command's subparsers."""
    p = subparsers.add_parser("teacher", help="run named teachers as a shared service (up / down / status)")
    sub = p.add_subparsers(dest="teacher_command", required=True)
    up = sub.add_parser("up", help="start the teachers of a service config (running ones are kept)")
    up.add_argument("config", help="service YAML, e.g. serve/teachers.yaml")
    up.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. proxy.port=8001")
    down = sub.add_parser("down", help="delete a running teacher")
    down.add_argument("name")
    for s in (up, sub.add_parser("status", help="list running teachers")):
        s.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
    with console.user_errors(ValueError, RuntimeError, FileNotFoundError):
        if args.teacher_command == "up":
            out = teacher_up(load_config(TeacherServiceConfig, args.config, args.overrides))
            if args.json:
                print(json.dumps(out, indent=2))
            else:
                _print_table(out["teachers"], ("name", "started", "url"))
        elif args.teacher_command == "down":
            teacher_down(args.name)
            print(f"teacher {args.name!r} stopped")
        else:
            rows = teacher_status()
            if args.json:
                print(json.dumps(rows, indent=2))
            elif rows:
                _print_table(rows, ("name", "status", "replicas", "url", "weights_fingerprint"))
            else:
                print("no teachers running")
