"""A long-lived multi-teacher service: named teachers on a Ray cluster, shared by many runs.

    raykd teacher up serve/teachers.yaml [key=value ...]   # start (or keep) every teacher
    raykd teacher status [--json]                          # name, status, replicas, fingerprints
    raykd teacher down <name>                              # delete one teacher (raykd's only)
    raykd teacher env                                      # export lines: RAY_ADDRESS, RAY_AUTH_MODE
    raykd teacher stop-cluster                             # stop raykd's own cluster

(the command line: :mod:`raykd.teacher.service_cli`)

With no address named (``ray.address``, ``$RAY_ADDRESS``) the teachers run on raykd's own
cluster, recorded in the user cache (:mod:`raykd.cluster`); raykd never deploys into, lists or
deletes from a cluster it was not told to use, nor touches an application it did not deploy.

Each teacher is its own Serve application, named by ``TeacherConfig.name``, with its own
replicas and optionally an HTTP API in front (:mod:`raykd.teacher.http`). Serve applications
belong to the cluster, not to the process that started them, so they keep serving after
``teacher up`` exits; a student run with ``teacher.name=<name>`` finds and reuses the running
teacher (:func:`raykd.teacher.apps.start_teacher`) instead of loading its own.

The config models here are plain data; Ray is imported only by the functions that use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from raykd.cluster import (
    RECORDED,
    ClusterRecord,
    cluster_dir,
    join,
    owned_cluster,
    recorded_cluster,
    use_auth_mode,
)
from raykd.config import RayConfig, Strict, TeacherAutoscalingConfig, TeacherConfig, check_custom_resources
from raykd.models import resolve_model_path
from raykd.teacher.schemas import HTTPConfig

log = logging.getLogger(__name__)


class ProxyConfig(Strict):
    """Where Serve's HTTP proxy listens (one per cluster, shared by every teacher)."""

    host: str = "127.0.0.1"
    """Interface to bind; ``0.0.0.0`` exposes the teachers beyond this machine (set a token)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port of the proxy (1-65535); every teacher's routes share it."""


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
    """Cluster to use: ``ray.address`` or ``$RAY_ADDRESS`` when named, else raykd's own (the
    recorded one if alive, else a new one started with ``ray start --head`` in its own temp dir,
    so the teachers outlive the command); ``ray.num_cpus``: CPUs of a new one."""
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    """Host and port of Serve's HTTP proxy (used when a teacher has ``http.enabled``; an already
    running proxy keeps its own and a warning says so)."""
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
    # lazy: keeps ray out of import time
    from raykd.teacher.apps import GRACEFUL_SHUTDOWN_S, SHUTDOWN_POLL_S, teacher_app
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
    ingress = HTTPIngress.options(max_ongoing_requests=http.max_ongoing_requests, max_queued_requests=http.max_queued_requests,
                                  graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,  # as the teacher: finish what it took
                                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
    return ingress.bind(node, http)


def placement_options(served: ServedTeacher) -> dict[str, Any]:
    """Serve ``Deployment.options`` that add ``served.resources`` to each replica (empty when there
    are none): to the replica actor, and with tensor/pipeline parallelism also to the replica's own
    (first) placement-group bundle, which the actor runs in (pure: starts nothing)."""
    # lazy: keeps ray out of import time
    from raykd.teacher.apps import deployment_options

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
        ValueError: as :func:`raykd.teacher.apps.check_cluster_resources` (GPUs), or no
            single node has every resource one replica needs (the message lists the nodes).
    """
    # lazy: keeps ray out of import time
    from raykd.teacher.apps import check_cluster_resources

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


def _connect(ray_cfg: RayConfig | None, *, start: bool) -> ClusterRecord | None:
    """Join the teachers' cluster: the one named by ``ray.address`` or ``$RAY_ADDRESS``, else
    raykd's own recorded cluster (``ray.address=raykd`` names it too), never another one.

    With ``start``, a missing or dead recorded cluster is replaced by a new one (see
    :func:`raykd.cluster.owned_cluster`: own temp dir, free ports, token auth, raykd's Python, so
    jobs submitted to it run in raykd's environment).

    Returns:
        The record of raykd's cluster when that is the one joined, else None (a named cluster, or
        Ray already initialised in this process).

    Raises:
        NoClusterError: no address is named, ``start`` is false and no raykd cluster runs.
        ClusterError: the cluster refused the connection (token authentication).
    """
    import ray

    if ray.is_initialized():
        return None
    address = (ray_cfg.address if ray_cfg else None) or os.environ.get("RAY_ADDRESS")
    if address and address != RECORDED:
        join(address)
        return None
    if start:
        record, started = owned_cluster(ray_cfg.num_cpus if ray_cfg else None)
        log.info("%s raykd's Ray cluster at %s", "started" if started else "using", record.gcs_address)
    elif (record := recorded_cluster()) is None:
        raise NoClusterError(f"no raykd cluster is running (record: {cluster_dir() / 'cluster.json'}): `raykd teacher up` "
                             "starts one; for another cluster set RAY_ADDRESS=HOST:PORT")
    use_auth_mode(record.auth_mode)
    join(record.gcs_address)
    return record


class NoClusterError(ValueError):
    """No cluster is named and raykd's own is not running."""


def _teacher_apps(details) -> dict[str, Any]:
    """The teacher applications raykd deployed (others on the cluster are not listed)."""
    # lazy: keeps ray out of import time
    from raykd.teacher.deployment import DEPLOYMENT_NAME
    from raykd.teacher.apps import deployed_by_raykd

    apps = details.applications if details is not None else {}
    return {name: app for name, app in sorted(apps.items()) if DEPLOYMENT_NAME in app.deployments and deployed_by_raykd(app)}


def _base_url(details) -> str | None:
    opts = details.http_options if details is not None else None
    if opts is None or str(getattr(details.proxy_location, "value", details.proxy_location)) == "Disabled":
        return None
    return f"http://{opts.host}:{opts.port}"


def teacher_up(cfg: TeacherServiceConfig) -> dict[str, Any]:
    """Start every teacher of ``cfg`` that is not running yet; leave running ones as they are.

    The cluster is the one ``cfg.ray.address`` or ``$RAY_ADDRESS`` names, else raykd's own
    (started now, or the recorded one reused: see :func:`_connect`).

    Returns:
        ``{"address": <GCS address>, "cluster": {"dashboard", "temp_dir", "env"} or None,
        "teachers": [{"name", "started", "url"}, ...]}``; ``cluster`` describes raykd's own cluster
        (None on a named one), ``env`` the variables a shell sets to use it (``RAY_ADDRESS``,
        ``RAY_AUTH_MODE``); ``url`` is a teacher's HTTP base URL (None when HTTP is off).

    Raises:
        RuntimeError: HTTP is wanted but Serve already runs on this cluster without a proxy
            (started by a run with HTTP off): ``serve shutdown`` first, or turn HTTP off.
        FileNotFoundError: a teacher model cannot be found (from ``resolve_model_path``).
        ValueError: no node of the cluster can hold a replica of a teacher to start (see
            :func:`check_placeable`); nothing is deployed then. ``ForeignAppError``: an
            application of a teacher's name exists that raykd did not deploy.
        ClusterError: the named cluster refused the connection (token authentication).
    """
    # lazy: keeps ray out of import time
    import ray
    from ray import serve

    from raykd.teacher.apps import running_teacher, serve_details

    record = _connect(cfg.ray, start=True)
    new = [t for t in cfg.teachers if running_teacher(t.teacher.name) is None]
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for t in new:  # every teacher to start is checked before the first one deploys
        check_placeable(t, nodes)
    want_http = any(t.http.enabled for t in cfg.teachers)
    serve.start(proxy_location="HeadOnly" if want_http else "Disabled", http_options=cfg.proxy.model_dump())
    base = _base_url(serve_details())
    if want_http and base is None:
        raise RuntimeError("Serve already runs on this cluster without an HTTP proxy; run `serve shutdown` "
                           "(stops every Serve app) and retry, or set http.enabled=false for each teacher")
    if want_http and base != f"http://{cfg.proxy.host}:{cfg.proxy.port}":
        log.warning("Serve's HTTP proxy already listens on %s; the proxy settings of this config are ignored", base)
    # Find every model before deploying any, so a typo fails before the first teacher loads.
    apps = {t.teacher.name: served_teacher_app(t, str(resolve_model_path(t.teacher.model))) for t in new}
    for t in new:
        serve.run(apps[t.teacher.name], name=t.teacher.name, route_prefix=t.route_prefix, blocking=False)
    running = _teacher_apps(serve_details())
    out = []
    for t in cfg.teachers:
        name = t.teacher.name
        if name not in apps:
            log.info("teacher %r is already running: left as it is (`raykd teacher down %s` to replace it)", name, name)
        prefix = running[name].route_prefix if name in running else None
        out.append({"name": name, "started": name in apps, "url": f"{base}{prefix}" if base and prefix else None})
    return {"address": ray.get_runtime_context().gcs_address, "cluster": _cluster_row(record), "teachers": out}


def _cluster_row(record: ClusterRecord | None) -> dict[str, Any] | None:
    """What a user needs of raykd's own cluster: where it is and the variables to use it."""
    if record is None:
        return None
    return {"dashboard": record.dashboard_url, "temp_dir": record.temp_dir, "env": record.env()}


def teacher_status() -> list[dict[str, Any]]:
    """The teachers raykd deployed on the cluster (``$RAY_ADDRESS``, else raykd's own recorded
    one); empty when there is no such cluster or no Serve. Applications raykd did not deploy are
    not listed.

    Returns:
        One dict per teacher: ``name``, ``status`` (Serve's application status), ``replicas``
        (running), ``url`` (HTTP base URL or None), and for running teachers
        ``weights_fingerprint``, ``tokenizer_fingerprint``, ``vocab_size``, ``calls``.
    """
    # lazy: keeps ray out of import time
    from ray import serve

    from raykd.teacher.deployment import DEPLOYMENT_NAME
    from raykd.teacher.apps import serve_details

    try:
        _connect(None, start=False)
    except NoClusterError:
        return []
    details = serve_details()
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
    """Delete the teacher application ``name`` that raykd deployed (its replicas and HTTP routes)
    on the cluster of ``$RAY_ADDRESS``, else raykd's own.

    Requests the replicas have accepted are finished first (up to the deployment's
    ``graceful_shutdown_timeout_s``, :data:`raykd.teacher.apps.GRACEFUL_SHUTDOWN_S`); new
    ones are refused from the start of the deletion.

    Raises:
        ValueError: no teacher of that name runs (the message lists the running ones), or no
            cluster runs. ``ForeignAppError``: an application of that name exists but raykd did
            not deploy it (it is left running).
    """
    # lazy: keeps ray out of import time
    from ray import serve

    from raykd.teacher.apps import check_ours, serve_details

    _connect(None, start=False)
    details = serve_details()
    apps = details.applications if details is not None else {}
    if name in apps:
        check_ours(name, apps[name])
    running = list(_teacher_apps(details))
    if name not in running:
        raise ValueError(f"no teacher named {name!r} is running; running teachers: {', '.join(running) or 'none'}")
    serve.delete(name)


def teacher_env() -> dict[str, str]:
    """The shell variables that point Ray's tools and raykd at raykd's own cluster
    (``eval "$(raykd teacher env)"``, then ``ray job submit -- ...``).

    Raises:
        NoClusterError: raykd's cluster is not running.
    """
    record = recorded_cluster()
    if record is None:
        raise NoClusterError(f"no raykd cluster is running (record: {cluster_dir() / 'cluster.json'}): "
                             "`raykd teacher up` starts one")
    return record.env()
