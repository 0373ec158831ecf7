"""Connecting to Ray, and the Ray cluster raykd owns.

raykd joins a running cluster only when the user names it (``ray.address=HOST:PORT``,
``ray.address=auto``, ``$RAY_ADDRESS``) or asks for raykd's own (``ray.address=raykd``); with no
address a run starts a fresh local Ray of its own (``ray.init(address="local")``), never the most
recent ``ray start`` on the machine, which Ray 2.60's bare ``ray.init()`` would join
(``ray/_private/services.py``: ``canonicalize_bootstrap_address`` reads ``ray_current_cluster``
unless the address is ``"local"``).

raykd's own cluster is what ``raykd teacher up`` starts when no address is named: a head node in
its own temp dir and on free ports, run by raykd's Python, with Ray's token authentication on.
Its address is recorded in the user cache (``<cache>/cluster/cluster.json``, see
:func:`raykd.config.default_cache_root`); ``teacher status``/``down``/``env``, ``ray.address=raykd``
and runs with ``teacher.start=false`` find it there. A file lock makes two ``teacher up`` at once
start one cluster; a record whose cluster is gone is replaced.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from hashlib import sha1
from pathlib import Path
from types import SimpleNamespace

from raykd import console
from raykd.config import RayConfig, default_cache_root
from raykd.console import UserError

log = logging.getLogger(__name__)

RECORDED = "raykd"
"""``ray.address`` value that means raykd's own recorded cluster (:func:`recorded_cluster`)."""
AUTH_HINT = ("set RAY_AUTH_MODE=token and make the cluster's token readable: ~/.ray/auth_token, "
             "RAY_AUTH_TOKEN_PATH=<file> or RAY_AUTH_TOKEN=<token> (`ray get-auth-token` prints it on a host of the cluster)")


class ClusterError(UserError):
    """A cluster that cannot be reached as asked: no recorded raykd cluster, or one that refused
    the connection (token authentication); the message says what to set."""


def connect(cfg: RayConfig, *, recorded: bool = False) -> bool:
    """Initialise Ray once per process.

    Joins the cluster the user names: ``cfg.address`` or ``$RAY_ADDRESS`` (set by ``ray job
    submit``), ``raykd`` meaning raykd's own recorded cluster. With no address, and ``recorded``
    true and a live recorded cluster, joins that one; else starts a new local Ray owned by this
    process, even when other clusters run on the machine. Under the ``raykd`` command, Ray's own
    output goes to the run's log folder rather than the console (see :mod:`raykd.console`).

    Args:
        cfg: ``ray`` section (``address``; ``num_cpus`` of a new local Ray).
        recorded: the run uses a teacher it may not start (``teacher.start=false``): look for it
            on raykd's recorded cluster when no address is named.

    Returns:
        True if this call started a new local Ray (the caller owns and may shut it down).

    Raises:
        ClusterError: ``ray.address=raykd`` with no live recorded cluster, or a cluster that
            refused the connection (token authentication: the message names what to set).
    """
    import ray

    if ray.is_initialized():
        console.ray_connected(started=False)
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address == "local":  # Ray's word for "a new local Ray", as with no address
        address = None
    if address == RECORDED or (not address and recorded and recorded_cluster() is not None):
        address = join_recorded()
    if address:
        join(address)
        console.ray_connected(started=False)
        return False
    # Ray Train's worker print patch echoes every line twice on a local cluster.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The dashboard also serves the state API that Ray Train's controller polls; on a busy small
    # machine it can take longer than Ray's default 60 s to start.
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    # Ray 2.60 turns token auth on for a new local Ray, with a WARNING unless the mode is set: set it.
    use_auth_mode(os.environ.get("RAY_AUTH_MODE") or "token")
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, **console.ray_init_options())
    console.ray_connected(started=True)
    return True


def join(address: str) -> None:
    """``ray.init(address=address)`` that turns a refused connection into one :class:`ClusterError`.

    A cluster with token authentication refuses a client without its token; Ray's GCS client then
    retries for ~10 s, writing a C++ WARNING line to stderr each time, and raises a chained error.
    Those lines are held back and dropped when the refusal is an authentication one.

    Raises:
        ClusterError: the cluster refused the token (or its absence); the message says what to set.
        ConnectionError: no cluster answers at ``address`` (Ray's own error).
    """
    import ray

    with _held_stderr() as held:
        try:
            ray.init(address=address, **console.ray_init_options())
        except (ConnectionError, RuntimeError) as e:
            if not _auth_refusal(e):
                raise
            held.drop = True
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            raise ClusterError(f"the Ray cluster at {address} refused the connection: it uses token authentication "
                               f"(RAY_AUTH_MODE here: {mode}); {AUTH_HINT}") from None


def _auth_refusal(e: BaseException) -> bool:
    """Whether ``e`` (or an error it chains) is Ray's token-authentication refusal."""
    while e is not None:
        text = f"{type(e).__name__}: {e}"
        if "InvalidAuthToken" in text or "AuthenticationError" in text or "no authentication token was found" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def _held_stderr() -> Iterator[SimpleNamespace]:
    """Hold what this process (C++ code included) writes to file descriptor 2 in the block, and
    write it out at the end unless the caller set ``drop`` on the yielded object."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = SimpleNamespace(drop=False)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not held.drop:
                f.seek(0)
                with os.fdopen(os.dup(2), "wb") as out:
                    out.write(f.read())


def node_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a Ray node started by raykd runs in: ``env`` (default: this process's)
    with the folder of this Python interpreter first on ``PATH``.

    A node's raylet, and through it every job driver, inherits the environment of the ``ray start``
    that launched it. ``ray job submit -- python script.py`` runs ``python`` found on that ``PATH``,
    so without this a cluster started by ``.venv/bin/raykd`` (virtualenv not activated) runs its jobs
    in whatever ``python`` comes first on the user's ``PATH`` (e.g. a system Python without torch).
    ``VIRTUAL_ENV`` is set too when this interpreter runs in a virtualenv.
    """
    out = dict(os.environ if env is None else env)
    bindir = os.path.dirname(sys.executable)
    out["PATH"] = os.pathsep.join([bindir, *(p for p in out.get("PATH", "").split(os.pathsep) if p and p != bindir)])
    if sys.prefix != sys.base_prefix:
        out["VIRTUAL_ENV"] = sys.prefix
    return out


def ray_start_command(*args: str) -> list[str]:
    """``ray start ARGS`` run by this Python interpreter (not the first ``ray`` on ``PATH``), so the
    node's workers run the same interpreter and packages as raykd."""
    return [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats", *args]


def start_node(*args: str, env: Mapping[str, str] | None = None, timeout_s: float = 300.0) -> int:
    """Start a Ray node (``ray start ARGS``, e.g. ``--head`` or ``--address=HOST:PORT``) that runs
    jobs and workers in raykd's own environment (see :func:`ray_start_command`, :func:`node_env`).

    The node's processes outlive this call and this process; they share one new process group.

    Args:
        *args: ``ray start`` options (``--head``, ``--num-cpus=2``, ``--resources={"x": 1}``, ports).
        env: base environment of the node (default: this process's); ``PATH`` is fixed up as in
            :func:`node_env`.
        timeout_s: seconds ``ray start`` may take before it is given up (it returns once the
            node's processes are up, usually in 5-30 s).

    Returns:
        The id of the node's process group: ``os.killpg(pgid, signal.SIGTERM)`` stops this node
        only (``ray stop`` stops every Ray node of the user on this machine).

    Raises:
        RuntimeError: ``ray start`` failed or timed out (the message holds the end of its output,
            e.g. a port already in use: pass other ports, or join the running cluster instead);
            the processes it had started are stopped.
    """
    cmd = ray_start_command(*args)
    try:
        proc = subprocess.Popen(cmd, env=node_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_groups([proc.pid])  # what it started so far too (a GCS, a dashboard)
        out, _ = proc.communicate()
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {timeout_s:g} s; its output ends:\n{out[-2000:]}") from None
    if proc.returncode != 0:
        stop_groups([proc.pid])  # a failed start leaves the processes it had started running
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); its output ends:\n{out[-2000:]}")
    return proc.pid


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports of 127.0.0.1 that are free now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_port_args() -> list[str]:
    """``ray start`` options that put one node's own servers on free ports: Ray's fixed defaults
    (52365, 10001, ...) would clash with any other Ray node on this machine."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    return [f"--{name}={port}" for name, port in zip(names, free_ports(len(names)))]


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process exited while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_groups(pgids: list[int], grace_s: float = 10.0) -> None:
    """Stop nodes started by :func:`start_node`: SIGTERM to their process groups, SIGKILL to what
    is left after ``grace_s`` (``ray stop`` would stop every Ray node of the user instead)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(map(group_alive, pgids)) and time.monotonic() < deadline:
            time.sleep(0.2)  # polling /proc: there is no event for "a process group is empty"


@dataclass(frozen=True)
class ClusterRecord:
    """raykd's own cluster, as recorded in ``<cache>/cluster/cluster.json``."""

    gcs_address: str
    """``HOST:PORT`` of the head's GCS: ``ray.address`` / ``$RAY_ADDRESS`` of a driver."""
    dashboard_url: str
    """``http://HOST:PORT``: ``ray job submit --address``, the dashboard."""
    pgid: int
    """Process group of the head's processes (:func:`stop_owned_cluster` stops it)."""
    temp_dir: str
    """The head's ``--temp-dir`` (its sessions and logs), shared with no other cluster."""
    auth_mode: str
    """``RAY_AUTH_MODE`` the head runs with (``token`` unless the user set another)."""

    def alive(self) -> bool:
        """The head's processes run and its GCS port accepts connections."""
        if not group_alive(self.pgid):
            return False
        host, _, port = self.gcs_address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2.0).close()
        except OSError:
            return False
        return True

    def env(self) -> dict[str, str]:
        """The variables a shell needs to use this cluster (``ray job submit``, ``raykd distill``)."""
        return {"RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": self.auth_mode}


def cluster_dir(cache_root: Path | None = None) -> Path:
    """Folder of raykd's cluster record and its lock: ``<cache root>/cluster``."""
    return (cache_root or default_cache_root()) / "cluster"


def read_record(cache_root: Path | None = None) -> ClusterRecord | None:
    """The recorded cluster (alive or not), None when there is no readable record."""
    try:
        return ClusterRecord(**json.loads((cluster_dir(cache_root) / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def recorded_cluster(cache_root: Path | None = None) -> ClusterRecord | None:
    """The recorded cluster if it is alive, else None."""
    record = read_record(cache_root)
    return record if record is not None and record.alive() else None


def join_recorded() -> str:
    """Prepare this process to join raykd's recorded cluster (its auth mode) and return its address.

    Raises:
        ClusterError: no live cluster is recorded.
    """
    record = recorded_cluster()
    if record is None:
        raise ClusterError(f"ray.address=raykd: no raykd cluster is running (record: {cluster_dir() / 'cluster.json'}); "
                           "start one with `raykd teacher up`, or name a cluster with ray.address=HOST:PORT")
    use_auth_mode(record.auth_mode)
    return record.gcs_address


def use_auth_mode(mode: str) -> None:
    """Set ``RAY_AUTH_MODE`` for this process and the processes it starts, before ``ray.init``.

    Ray caches its config, mode included, at the first use; ``Config.initialize`` reads it again
    (as Ray's own ``authentication_token_setup._enable_token_auth`` does).
    """
    from ray._raylet import Config

    if os.environ.get("RAY_AUTH_MODE") != mode:
        os.environ["RAY_AUTH_MODE"] = mode
        Config.initialize("")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (other processes wait for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def owned_cluster(num_cpus: int | None = None, cache_root: Path | None = None) -> tuple[ClusterRecord, bool]:
    """raykd's own cluster: the recorded one if alive, else a new head node, recorded.

    Under a file lock, so concurrent callers get one cluster; a record of a dead cluster is replaced.

    Args:
        num_cpus: CPUs of a new head (None: all cores).
        cache_root: user cache root (default :func:`raykd.config.default_cache_root`).

    Returns:
        ``(record, started)``: ``started`` is True when this call started the cluster.

    Raises:
        RuntimeError: ``ray start`` failed twice (as :func:`start_node`).
    """
    folder = cluster_dir(cache_root)
    with _locked(folder / "cluster.lock"):
        old = read_record(cache_root)
        if old is not None and old.alive():
            return old, False
        if old is not None:
            log.warning("the recorded raykd cluster at %s is gone: starting a new one", old.gcs_address)
        try:
            record = _start_owned(folder, num_cpus)
        except RuntimeError as e:  # e.g. Ray's 30 s raylet start-up limit on an overloaded machine
            log.warning("starting raykd's cluster failed; trying once more on other ports (%s)", str(e).splitlines()[-1])
            record = _start_owned(folder, num_cpus)
        tmp = folder / "cluster.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(folder / "cluster.json")
        return record, True


def _start_owned(folder: Path, num_cpus: int | None) -> ClusterRecord:
    """Start raykd's head node: own temp dir and free ports, token auth unless the user set a mode."""
    # Short: Ray's socket paths under the temp dir must fit in 107 bytes; one folder per cache root.
    temp_dir = Path(tempfile.gettempdir()) / f"raykd-{sha1(str(folder.resolve()).encode()).hexdigest()[:8]}"
    mode = os.environ.get("RAY_AUTH_MODE") or "token"
    if mode == "token":
        ensure_auth_token()
    gcs, dashboard, client = free_ports(3)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = mode
    args = ["--head", f"--temp-dir={temp_dir}", f"--port={gcs}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", *node_port_args(),
            *([f"--num-cpus={num_cpus}"] if num_cpus else [])]
    log.info("starting raykd's own Ray cluster: `ray start %s`", " ".join(args))
    pgid = start_node(*args, env=env)
    host = _head_host(temp_dir) or "127.0.0.1"
    return ClusterRecord(gcs_address=f"{host}:{gcs}", dashboard_url=f"http://127.0.0.1:{dashboard}", pgid=pgid,
                         temp_dir=str(temp_dir), auth_mode=mode)


def _head_host(temp_dir: Path) -> str | None:
    """Host of the GCS address the head wrote to ``<temp_dir>/ray_current_cluster`` (Ray binds it to
    this machine's address, not 127.0.0.1), None if unreadable."""
    try:
        return (temp_dir / "ray_current_cluster").read_text().split()[0].rpartition(":")[0] or None
    except (OSError, IndexError):
        return None


def ensure_auth_token() -> None:
    """Create Ray's default auth token (``~/.ray/auth_token``) when no token is available, with
    Ray's own ``ray get-auth-token --generate`` (a head with ``RAY_AUTH_MODE=token`` refuses to
    start without one; clients on this machine then find it where Ray looks by default)."""
    if os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser().is_file():
        return
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], check=True,
                   capture_output=True, timeout=120)


def stop_owned_cluster(cache_root: Path | None = None) -> ClusterRecord | None:
    """Stop raykd's recorded cluster (its process group; not ``ray stop``, which stops every Ray
    node of the user) and remove the record. Returns the record, None when there was none."""
    folder = cluster_dir(cache_root)
    with _locked(folder / "cluster.lock"):
        record = read_record(cache_root)
        if record is not None:
            stop_groups([record.pgid])
            (folder / "cluster.json").unlink(missing_ok=True)
        return record
