"""raykd's own cluster without starting Ray: the record, the refusals, the app mark.

The clusters themselves (a foreign one beside raykd's, the lock, jobs) are tested for real in
tests/slow/test_two_nodes.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from raykd.cluster import ClusterError, ClusterRecord, _auth_refusal, _held_stderr, cluster_dir, connect, read_record, recorded_cluster
from raykd.config import RayConfig


def test_a_record_of_a_dead_cluster_is_not_used(tmp_path):
    assert read_record(tmp_path) is None
    cluster_dir(tmp_path).mkdir()
    (cluster_dir(tmp_path) / "cluster.json").write_text("{not json")
    assert read_record(tmp_path) is None
    dead = ClusterRecord(gcs_address="127.0.0.1:9", dashboard_url="http://127.0.0.1:9", pgid=os.getpgid(0),
                         temp_dir=str(tmp_path), auth_mode="token")  # this group lives, but nothing listens on port 9
    (cluster_dir(tmp_path) / "cluster.json").write_text(json.dumps(asdict(dead)))
    assert read_record(tmp_path) == dead and not dead.alive() and recorded_cluster(tmp_path) is None


def test_ray_address_raykd_without_a_running_cluster_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path))
    started: list = []  # the suite's shared Ray may already run in this process: act as if it did not
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(k))
    with pytest.raises(ClusterError, match="no raykd cluster is running .* `raykd teacher up`"):
        connect(RayConfig(address="raykd"))
    assert started == []


def test_an_auth_refusal_is_told_apart_from_other_connection_errors():
    refused = RuntimeError("Failed to connect to GCS. ... ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken")
    wrapped = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    wrapped.__cause__ = refused
    assert _auth_refusal(wrapped)
    assert not _auth_refusal(ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"))


@pytest.mark.parametrize("drop", [True, False])
def test_held_stderr_drops_or_passes_what_c_code_writes(capfd, drop):
    with _held_stderr() as held:
        os.write(2, b"W gcs_client.cc: InvalidAuthToken\n")  # file descriptor 2, as Ray's C++ logger writes
        held.drop = drop
    assert ("InvalidAuthToken" in capfd.readouterr().err) is not drop


def test_apps_raykd_deploys_carry_its_mark_and_others_do_not():
    from raykd.teacher.deployment import DEPLOYMENT_NAME
    from raykd.teacher.apps import OWNER_ENV, ForeignAppError, check_ours, deployed_by_raykd, owner_marked

    options = owner_marked({"num_cpus": 1, "runtime_env": {"env_vars": {"KEEP": "1"}, "pip": ["x"]}})
    assert options["num_cpus"] == 1 and options["runtime_env"]["pip"] == ["x"]
    assert options["runtime_env"]["env_vars"] == {"KEEP": "1", OWNER_ENV: "raykd"}

    def app(actor_options):
        config = SimpleNamespace(ray_actor_options=SimpleNamespace(**actor_options))
        return SimpleNamespace(deployments={DEPLOYMENT_NAME: SimpleNamespace(deployment_config=config)})

    assert deployed_by_raykd(app(options))
    for foreign in (app({"runtime_env": {}}), app({"runtime_env": {"env_vars": {OWNER_ENV: "someone"}}}),
                    SimpleNamespace(deployments={})):
        assert not deployed_by_raykd(foreign)
        with pytest.raises(ForeignAppError, match="'theirs' on this cluster was not deployed by raykd"):
            check_ours("theirs", foreign)
