"""A real S3-compatible server on loopback for tests: moto in server mode (``moto[server]``).

Registered as a pytest plugin (``pytest_plugins = ["tests.s3_server"]`` in ``tests/conftest.py``,
or ``pytest -p tests.s3_server``). The ``s3_server`` fixture starts one ``python -m moto.server``
process per test session on a free 127.0.0.1 port, creates a bucket and an IAM user with its own
keys, then turns on moto's request authentication: from then on the server rejects requests
signed with any other key (``ACCESS_DENIED``), as AWS does, so a test that passes proves the keys
reached the process that made the request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_REGION = "us-east-1"
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        bucket: a bucket that exists on it.
        access_key: the only key the server accepts.
        secret_key: its secret.
        log: the server's log file.
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment pyarrow (and boto3) need to reach the server: pass it to Ray workers
        as ``runtime_env={"env_vars": server.env}``. Metadata lookups (the EC2 instance role) are
        switched off, so a missing key fails at once instead of probing a link-local address."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": _REGION,
            "AWS_DEFAULT_REGION": _REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def uri(self, path: str = "") -> str:
        """``s3://<bucket>/<path>``."""
        return f"s3://{self.bucket}/{path.lstrip('/')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(endpoint: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}; its log:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)  # polling a readiness condition, bounded by the deadline
    raise RuntimeError(f"moto server not answering at {endpoint} after {_START_TIMEOUT_S:.0f} s; log: {log}")


def _create_bucket_and_user(endpoint: str, bucket: str) -> tuple[str, str]:
    """Create the bucket and a user allowed ``s3:*``; return its keys (before auth is on, any key works)."""
    import boto3

    admin = {"endpoint_url": endpoint, "region_name": _REGION, "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="raykd-tests")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="raykd-tests", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="raykd-tests")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _require_auth(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One S3-compatible server for the test session, with the ``AWS_*`` variables of
    :attr:`S3Server.env` set in this process while it runs (restored afterwards).

    Skips when ``moto[server]`` is not installed, except in CI (``CI`` set), where it fails.
    """
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"moto[server] is not installed in CI ({e}): it is in the dev extra")
        pytest.skip(f"moto[server] not installed ({e}): pip install -e .[dev]")
    log = tmp_path_factory.mktemp("s3_server") / "moto.log"
    endpoint = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    saved = {k: os.environ.get(k) for k in S3Server("", "", "", "", log).env}
    try:
        _wait_until_up(endpoint, process, log)
        bucket = "raykd-test"
        access_key, secret_key = _create_bucket_and_user(endpoint, bucket)
        _require_auth(endpoint)
        server = S3Server(endpoint=endpoint, bucket=bucket, access_key=access_key, secret_key=secret_key, log=log)
        os.environ.update(server.env)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
