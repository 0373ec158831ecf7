"""A two-node Ray cluster on this machine, started the way ``raykd teacher up`` starts one, with
raykd's virtualenv left off ``PATH`` (as when a user calls ``.venv/bin/raykd`` without activating
it): jobs submitted to it run raykd's own Python, and ``ray job submit -- python jobs/distill.py``
runs the main job with the teacher on one node, the Train worker on the other and the soft-label
cache in a folder both nodes share. The same cluster is the foreign one (the "most recent
``ray start``") beside which raykd, with no address named, starts and keeps to a cluster of its own.

The pytest process never joins these nodes (``ray.init``), so the shared ``ray_start`` Ray of the
ray tier is not touched; every Ray call here goes through a subprocess or the dashboard's HTTP
state API. The nodes are stopped by their process groups, never by ``ray stop`` (which stops every
Ray node of the user on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml

from raykd.cluster import free_ports, group_alive, node_port_args, start_node, stop_groups

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
"""Folder of the test's (and raykd's) interpreter: the ``.venv/bin`` the nodes must run from."""
TEACHER = "two-node-teacher"


@dataclass
class TwoNodes:
    """The running cluster: where to reach it and which node carries which custom resource."""

    gcs: str
    """``HOST:PORT`` of the head node's GCS (``ray.address`` of a driver)."""
    dashboard: str
    """``http://HOST:PORT`` of the dashboard (``ray job submit --address``, the state API)."""
    tmp: Path
    """``$RAY_TMPDIR`` of every command: the head's temp dir is Ray's default there (``tmp/ray``),
    so this cluster is the "most recent ``ray start``" that a bare ``ray.init()`` would join."""
    env: dict[str, str]
    """Environment of every command the test runs against the cluster (venv not on ``PATH``)."""
    node_of: dict[str, str]
    """Node id of each custom resource: ``teacher_node`` (the head) and ``train_node``."""


def data_section(corpus: Path) -> dict:
    """The ``data`` section of the job's config (kept in this one place: its fields are changing)."""
    return {"source": "jsonl", "path": str(corpus), "id_column": "id", "splits": {"train": 0.8, "eval": 0.2}, "seq_len": 32,
            "min_tokens": 8, "part_docs": 20}


def _user_path_without_venv() -> str:
    """``PATH`` of a user who did not activate raykd's virtualenv."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != VENV_BIN)


def _stop_groups(pgids: list[int]) -> None:
    stop_groups(pgids, grace_s=5.0)
    assert not any(map(group_alive, pgids)), f"Ray processes of groups {pgids} survived SIGKILL"


def _wait_for_nodes(dashboard: str, resources: tuple[str, ...], timeout_s: float = 120.0) -> dict[str, str]:
    """Node id of each custom resource in ``resources``, once every one is on an alive node."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
        node_of = {r: n.node_id for n in nodes for r in resources if (n.resources_total or {}).get(r)}
        if len(node_of) == len(resources) or time.monotonic() > deadline:
            assert len(node_of) == len(resources), f"nodes with {resources} not all alive after {timeout_s:g} s: {nodes}"
            return node_of
        time.sleep(0.5)  # polling the GCS's node table: no event to wait on from outside the cluster


@pytest.fixture(scope="module")
def two_nodes():
    """A head node (2 CPUs, ``teacher_node``) and a worker node (2 CPUs, ``train_node``), started by
    :func:`raykd.cluster.start_node` from an environment whose ``PATH`` lacks the virtualenv."""
    tmp = tempfile.mkdtemp(prefix="rkd2n", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # RAY_AUTH_MODE: a new head turns on token auth when ~/.ray/auth_token exists, a joining node
    # does not; one explicit mode for both nodes and every client (the nodes listen on 127.0.0.1).
    env = {**os.environ, "PATH": _user_path_without_venv(), "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled"}
    for var in ("RAY_ADDRESS", "VIRTUAL_ENV"):
        env.pop(var, None)
    groups: list[int] = []
    try:
        for attempt in (1, 2):  # `ray start` gives up when its node is slow to come up (a loaded machine)
            gcs_port, dashboard_port, client_port = free_ports(3)
            try:
                groups.append(start_node(
                    "--head", f"--temp-dir={tmp}/ray", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    '--resources={"teacher_node": 1}', f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}", *node_port_args(), env=env))
                groups.append(start_node(  # its own temp dir, as on another machine: the head's session folder is not shared
                    f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={tmp}/w", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    '--resources={"train_node": 1}', *node_port_args(), env=env))
                break
            except RuntimeError:
                _stop_groups(groups)
                groups.clear()
                if attempt == 2:
                    raise
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        node_of = _wait_for_nodes(dashboard, ("teacher_node", "train_node"))
        assert node_of["teacher_node"] != node_of["train_node"]
        yield TwoNodes(gcs=f"127.0.0.1:{gcs_port}", dashboard=dashboard, tmp=Path(tmp), env=env, node_of=node_of)
    finally:
        _stop_groups(groups)
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(cluster: TwoNodes, entrypoint: list[str], *options: str, cwd: Path, timeout_s: float = 900.0) -> str:
    """``ray job submit`` (this venv's Ray CLI) and wait for the job; returns its output.

    Fails the test, with the end of the job's output, when the job does not succeed.
    """
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", cluster.dashboard, *options,
           "--", *entrypoint]
    proc = subprocess.run(cmd, env=cluster.env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, f"job failed (exit {proc.returncode}):\n{out[-4000:]}"
    return out


def _actors(cluster: TwoNodes, class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=cluster.dashboard, filters=[("class_name", "=", class_name)], detail=True, limit=1000,
                       raise_on_missing_output=False)


def _teacher_up(cluster: TwoNodes, teachers: list[dict], folder: Path) -> subprocess.CompletedProcess:
    """``.venv/bin/raykd teacher up`` (venv not activated) of ``teachers`` on the cluster."""
    path = folder / "teachers.yaml"
    path.write_text(yaml.safe_dump({"ray": {"address": cluster.gcs}, "teachers": teachers}))
    return subprocess.run([str(VENV_BIN / "raykd"), "teacher", "up", str(path), "--json"], env=cluster.env, cwd=folder,
                          capture_output=True, text=True, timeout=600, check=False)


def test_teacher_and_train_worker_on_their_nodes_through_ray_job_submit(two_nodes, tiny_model, corpus_jsonl, s3_server, tmp_path):
    """`raykd teacher up` places the teacher on the ``teacher_node`` (and refuses, deploying nothing,
    a teacher no node can hold); `ray job submit` runs jobs/distill.py, which reads the corpus from
    the S3 store, labels through that teacher into the cache on the S3 store and trains its one
    Ray Train worker on the ``train_node``. The job's ``python`` is raykd's: the bug of issue 10 was
    a cluster started from ``.venv/bin/raykd`` running its jobs in the first ``python`` on ``PATH``,
    which has no torch (the job below imports torch and raykd)."""
    from raykd import storage

    assert shutil.which("python", path=two_nodes.env["PATH"]) != sys.executable  # the user's PATH misses the venv

    shared = s3_server.uri("two-nodes/cache")  # the soft-label cache every node reaches
    corpus = s3_server.uri("two-nodes/corpus/articles.jsonl")
    storage.write_bytes(corpus, corpus_jsonl.read_bytes())
    teacher = {"teacher": {"name": TEACHER, "model": str(tiny_model), "num_threads": 1, "num_cpus": 0.5},
               "resources": {"teacher_node": 1}, "http": {"enabled": False}}
    nowhere = {**teacher, "teacher": {**teacher["teacher"], "name": "nowhere"}, "resources": {"gpu_node": 1}}
    up = _teacher_up(two_nodes, [teacher, nowhere], tmp_path)  # no node has gpu_node: nothing may deploy
    assert up.returncode == 2 and "teacher 'nowhere'" in up.stderr and "no node has all of it" in up.stderr, up.stderr[-4000:]
    assert not [a for a in _actors(two_nodes, f"ServeReplica:{TEACHER}:Teacher") if a.state == "ALIVE"]
    up = _teacher_up(two_nodes, [teacher], tmp_path)
    assert up.returncode == 0, up.stderr[-4000:]
    assert json.loads(up.stdout)["teachers"] == [{"name": TEACHER, "started": True, "url": None}]
    replicas = [a for a in _actors(two_nodes, f"ServeReplica:{TEACHER}:Teacher") if a.state == "ALIVE"]
    assert [a.node_id for a in replicas] == [two_nodes.node_of["teacher_node"]]

    config = {
        "run_name": "two-nodes",
        "data": data_section(corpus),
        "teacher": {"name": TEACHER, "model": str(tiny_model), "num_threads": 1, "num_cpus": 0.5},
        "labels": {"k": 8, "batch_size": 8, "cache_dir": str(shared), "num_labelers": 1},
        "student": {"keep_layers": [0, 3]},
        "train": {"students": {"student_kd": {"forward_kl": 0.5, "ce": 0.5}}, "num_workers": 1,
                  "resources_per_worker": {"train_node": 1}, "batch_size": 4, "max_steps": 2, "warmup_steps": 1,
                  "checkpoint_every": 2, "log_every": 1, "torch_threads": 1},
        "eval": {"batch_size": 8},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "run"
    start = time.perf_counter()
    runtime_env = yaml.safe_load((REPO / "jobs/runtime_env.yaml").read_text())
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **s3_server.env}  # the store's endpoint and keys
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    _submit(two_nodes, ["python", "jobs/distill.py", "--config", str(tmp_path / "distill.yaml"), "--output-dir", str(out_dir)],
            "--runtime-env", str(tmp_path / "runtime_env.yaml"), cwd=REPO)
    print(f"ray job submit jobs/distill.py: {time.perf_counter() - start:.0f} s")

    report = json.loads((out_dir / "report.json").read_text())
    cache = report["cache"]
    assert cache["path"].startswith(shared + "/") and cache["eval_path"].startswith(shared + "/")
    assert storage.is_file(storage.join(cache["path"], "manifest.json"))
    assert cache["hit"] is False and cache["teacher_calls"] > 0 and cache["rows"] > 0
    teacher = cache["teacher"]
    assert teacher["name"] == TEACHER and teacher["started_by_run"] is False  # labeled by the placed teacher
    assert any(a.name.endswith(teacher["replica"]) for a in replicas), (teacher, [a.name for a in replicas])
    assert report["student_kd"]["steps"] == 2
    workers = _actors(two_nodes, "RayTrainWorker")
    assert workers and {a.node_id for a in workers} == {two_nodes.node_of["train_node"]}


FOREIGN_APP = """
import ray
from ray import serve

ray.init(address="{gcs}")


@serve.deployment(name="Teacher")  # named like raykd's teacher deployment, but not raykd's
class Teacher:
    def __call__(self):
        return "not raykd's"


serve.run(Teacher.bind(), name="foreign-teacher", route_prefix=None)
"""


CONNECT = """
import ray
from raykd.cluster import connect
from raykd.config import RayConfig

assert not connect(RayConfig(), recorded=True)  # teacher.start=false: raykd's recorded cluster
print(ray.get_runtime_context().gcs_address.rpartition(":")[2])
ray.shutdown()
assert connect(RayConfig(num_cpus=1))  # else: a Ray of its own
print(ray.get_runtime_context().gcs_address.rpartition(":")[2])
"""


def _raykd(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``.venv/bin/raykd ARGS`` (venv not activated) in ``env``."""
    return subprocess.run([str(VENV_BIN / "raykd"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False)


def _serve_apps(dashboard: str) -> dict:
    """Serve's applications on the cluster of ``dashboard`` (its REST API; the cluster has no token auth)."""
    import requests

    return requests.get(f"{dashboard}/api/serve/applications/", timeout=30).json().get("applications") or {}


def _python(code: str, env: dict[str, str]) -> subprocess.Popen:
    """``python -c code`` started in the background (collect it with :func:`_finished`)."""
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(proc: subprocess.Popen) -> str:
    """Wait for ``proc``; fails the test with the end of its stderr unless it succeeded. Returns its stdout."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return out


def _own_env(two_nodes: TwoNodes, cache: Path, monkeypatch) -> dict[str, str]:
    """The environment of a user with no address and no ``RAY_AUTH_MODE`` set, raykd's cache in
    ``cache``; this process's own too (``owned_cluster`` starts the node from it)."""
    env = {**{k: v for k, v in two_nodes.env.items() if k != "RAY_AUTH_MODE"}, "RAYKD_CACHE": str(cache)}
    for name in ("PATH", "RAY_TMPDIR"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return env


def test_raykd_keeps_to_its_own_cluster_beside_a_foreign_one(two_nodes, tiny_model, tmp_path, monkeypatch):
    """Issue 24, part 2. With no address, `teacher up` starts (under a lock, replacing a stale record)
    raykd's own cluster instead of joining the most recent `ray start` (the two-node cluster), and
    so does a run (or joins the recorded one with teacher.start=false); a job submitted through
    raykd's record runs raykd's Python; `teacher down` refuses an app raykd did not deploy and
    finds raykd's teacher through the record. Independent steps run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    from raykd.cluster import ClusterRecord, cluster_dir, owned_cluster, read_record, stop_owned_cluster

    current = (two_nodes.tmp / "ray" / "ray_current_cluster").read_text().strip()
    assert current.endswith(two_nodes.gcs.rpartition(":")[2])  # what a bare ray.init() here would join
    cache, start = tmp_path / "cache", time.perf_counter()
    env = _own_env(two_nodes, cache, monkeypatch)
    foreign = _python(FOREIGN_APP.format(gcs=two_nodes.gcs), two_nodes.env)
    dead = ClusterRecord(gcs_address=f"127.0.0.1:{free_ports(1)[0]}", dashboard_url="http://127.0.0.1:9", pgid=2**22 + 7,
                         temp_dir=str(tmp_path / "gone"), auth_mode="token")
    cluster_dir(cache).mkdir(parents=True)
    (cluster_dir(cache) / "cluster.json").write_text(json.dumps(asdict(dead)))
    try:
        with ThreadPoolExecutor(2) as pool:  # two `teacher up` at once: one cluster, the stale record replaced
            (a, a_started), (b, b_started) = pool.map(lambda _: owned_cluster(2, cache), range(2))
        assert a == b == read_record(cache) != dead and {a_started, b_started} == {True, False}
        assert a.auth_mode == "token" and a.gcs_address.rpartition(":")[2] != two_nodes.gcs.rpartition(":")[2]
        connect = _python(CONNECT, env)  # distill, label, tune, mckd and muki connect through raykd.cluster.connect

        (tmp_path / "teachers.yaml").write_text(yaml.safe_dump({"teachers": [
            {"teacher": {"name": "own-teacher", "model": str(tiny_model), "num_threads": 1, "num_cpus": 0.5},
             "http": {"enabled": False}}]}))
        up = _raykd(env, "teacher", "up", str(tmp_path / "teachers.yaml"), "--json", cwd=tmp_path)
        assert up.returncode == 0, up.stderr[-4000:]
        out = json.loads(up.stdout)
        assert out["address"] == a.gcs_address and out["cluster"]["env"] == {"RAY_ADDRESS": a.gcs_address, "RAY_AUTH_MODE": "token"}

        _finished(foreign)
        assert "own-teacher" not in _serve_apps(two_nodes.dashboard)
        down = _raykd({**env, "RAY_ADDRESS": two_nodes.gcs}, "teacher", "down", "foreign-teacher", cwd=tmp_path)
        assert down.returncode == 2 and "was not deployed by raykd" in down.stderr, down.stderr[-4000:]
        assert [line for line in down.stderr.splitlines() if line.strip()] == [down.stderr.strip()]  # one line
        assert "foreign-teacher" in _serve_apps(two_nodes.dashboard)

        exports = _raykd(env, "teacher", "env", cwd=tmp_path)
        job_env = {**env, **dict(line.removeprefix("export ").split("=", 1) for line in exports.stdout.splitlines())}
        probe = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--",
                                "python", "-c", "import sys, torch, raykd; print('PROBE', sys.executable)"],
                               env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert f"PROBE {sys.executable}" in probe.stdout, (probe.stdout + probe.stderr)[-4000:]

        recorded, own = _finished(connect).split()[-2:]
        assert recorded == a.gcs_address.rpartition(":")[2] and own not in (recorded, two_nodes.gcs.rpartition(":")[2])
        down = _raykd(env, "teacher", "down", "own-teacher", cwd=tmp_path)  # found through the record
        assert down.returncode == 0 and "stopped" in down.stdout, down.stderr[-4000:]
    finally:
        stop_owned_cluster(cache)
    print(f"own cluster beside a foreign one: {time.perf_counter() - start:.0f} s")
    assert not group_alive(a.pgid) and read_record(cache) is None
