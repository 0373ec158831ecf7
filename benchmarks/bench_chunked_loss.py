"""The chunked loss (``train.loss_chunk_positions``): peak memory at a large vocabulary, and step
time at the demo's shape, against the unchunked step.

Memory: one training step (:func:`raykd.train.step.train_step`, AdamW) of a tiny-width student
built from a config with random weights (Llama, hidden 64, 2 layers, tied head; V = 262,144,
T = 2,048, batch 1 by default), each arm in a fresh process, whose peak RSS (``VmHWM`` of
``/proc/self/status``; on CUDA also ``torch.cuda.max_memory_allocated``) is read after the step:

- ``ce_chunked`` / ``kd_chunked``: ``{ce: 1}`` / ``{forward_kl: 0.5, ce: 0.5}`` on cached-form
  top-``k`` targets, through the chunked path (``--chunk`` positions per chunk);
- ``ce_whole`` / ``kd_whole``: the same through today's unchunked path (the whole ``[B, T, V]``
  logits and log-softmax). Skipped, with the reason, when the machine has too little memory free.

The ratios are KD over CE in each path (target for the chunked path: <= 1.15) and the unchunked
KD step over the chunked one.

Step time: the demo's student shape (SmolLM2-135M's widths, 6 of its 30 layers, V = 49,152,
random weights) on batches of 4 x 128 tokens with top-32 targets and the demo's 0.5 forward KL +
0.5 CE, unchunked against each ``--demo-chunks`` size, the arms taking turns step by step so
machine noise hits all alike (each arm trains its own copy); medians of the wall time and of the
process's CPU time (``time.process_time``, less sensitive to other work on a shared machine).
Target: chunked not slower.

    python benchmarks/bench_chunked_loss.py --out benchmarks/results/chunked_loss.json
    python benchmarks/bench_chunked_loss.py --device cuda --out chunked_loss_gpu.json   # the GPU suite's arm
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a source checkout (the GPU suite runs without installing raykd)
OBJECTIVES = {"kd": {"forward_kl": 0.5, "ce": 0.5}, "ce": {"ce": 1.0}}
ARMS = {"ce_chunked": ("ce", True), "kd_chunked": ("kd", True), "ce_whole": ("ce", False), "kd_whole": ("kd", False)}
"""Memory arm -> (objective, chunked)."""
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "tie_word_embeddings": True}
"""LlamaConfig fields of the memory arms' student (the vocabulary comes from ``--vocab``)."""
DEMO = {"hidden_size": 576, "num_hidden_layers": 6, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
"""The demo's student: SmolLM2-135M's widths with 6 of its 30 layers."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1, help="batch of the memory arms")
    p.add_argument("--k", type=int, default=32, help="cached top-k of the KD targets")
    p.add_argument("--chunk", type=int, default=256, help="positions per chunk of the memory arms")
    p.add_argument("--device", default="cpu")
    p.add_argument("--demo-chunks", type=int, nargs="*", default=[128, 512], help="chunk sizes timed at the demo shape")
    p.add_argument("--demo-steps", type=int, default=10, help="timed steps per demo arm (0: no timing)")
    p.add_argument("--demo-warmup", type=int, default=2)
    p.add_argument("--demo-layers", type=int, default=DEMO["num_hidden_layers"],
                   help="layers of the demo-shape student (fewer: a quicker check that the arms run, e.g. the GPU suite's --dry)")
    p.add_argument("--out", default="chunked_loss.json")
    p.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: one memory arm
    return p.parse_args(argv)


def student(shape: dict, vocab: int, seq_len: int, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**shape, "vocab_size": vocab}, max_position_embeddings=max(seq_len, 128))
    with torch.device(device):
        return LlamaForCausalLM(config)


def batch(vocab: int, rows: int, seq_len: int, k: int, device: str, seed: int = 0):
    """Random tokens with cache-form top-``k`` targets: ``k`` distinct ids per position, fp32
    log-probs of a random distribution over them and a tail bucket (``[rows, seq_len, k]``)."""
    from raykd.losses import TeacherTargets
    from raykd.train.step import StudentBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    base = torch.randint(0, vocab, (rows, seq_len, 1), generator=g)
    top_ids = (base + torch.arange(k) * (vocab // k)) % vocab  # distinct: k strides of V // k
    masses = torch.randn(rows, seq_len, k + 1, generator=g).log_softmax(-1)
    ids, labels, top_ids, masses = (t.to(device) for t in (ids, labels, top_ids, masses))
    targets = TeacherTargets.sparse(top_ids, masses[..., :k], masses[..., k])
    return StudentBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, labels >= 0, targets)


def status_mb(field: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` of this process, MB (None off Linux)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((int(ln.split()[1]) / 1024 for ln in lines if ln.startswith(f"{field}:")), None)


def available_mb() -> float | None:
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.is_file() else []
    return next((int(ln.split()[1]) / 1024 for ln in lines if ln.startswith("MemAvailable:")), None)


def child(args: argparse.Namespace) -> None:
    """One memory arm in this fresh process: build, one step, print peak memory as JSON."""
    from raykd.losses import Objective
    from raykd.train.step import build_optimizer, check_head_input, train_step

    kind, chunked = ARMS[args.child]
    model = student(TINY, args.vocab, args.seq_len, args.device)
    check_head_input(model)
    optimizer, _ = build_optimizer(list(model.parameters()), lr=1e-4)
    b = batch(args.vocab, args.rows, args.seq_len, args.k, args.device)
    before = status_mb("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    metrics = train_step(model, optimizer, [b], Objective(OBJECTIVES[kind]), 1.0,
                         chunk_positions=args.chunk if chunked else None)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    print(json.dumps({"peak_rss_mb": status_mb("VmHWM"), "rss_before_step_mb": before, "peak_gpu_mb": gpu,
                      "step_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu,
                      "loss": metrics["loss"]}))


def memory_arm(args: argparse.Namespace, arm: str) -> dict:
    """Run ``arm`` in a fresh process; skip an unchunked arm the free memory cannot hold."""
    whole_gb = 4.2 * args.rows * args.seq_len * args.vocab * 4 / 1e9 + 0.6  # measured: 4 fp32 [B, T, V] over 0.5 GB
    free = available_mb()
    if not ARMS[arm][1] and args.device == "cpu" and free is not None and free / 1e3 < whole_gb + 1.0:
        return {"skipped": f"needs about {whole_gb:.1f} GB, {free / 1e3:.1f} GB available"}
    cmd = [sys.executable, __file__, "--child", arm, "--vocab", str(args.vocab), "--seq-len", str(args.seq_len),
           "--rows", str(args.rows), "--k", str(args.k), "--chunk", str(args.chunk), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-800:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def demo_shape(args: argparse.Namespace) -> dict:
    """:data:`DEMO` with ``--demo-layers`` layers."""
    return {**DEMO, "num_hidden_layers": args.demo_layers}


def demo_times(args: argparse.Namespace) -> dict:
    """Step times at the demo's shape, unchunked and at each ``--demo-chunks`` size, arms taking
    turns step by step."""
    from raykd.losses import Objective
    from raykd.train.step import build_optimizer, train_step

    base = student(demo_shape(args), DEMO["vocab_size"], 128, args.device)
    batches = [batch(DEMO["vocab_size"], 4, 128, 32, args.device, seed=s) for s in range(4)]
    objective = Objective(OBJECTIVES["kd"])
    arms = {"whole": None, **{f"chunked_{c}": c for c in args.demo_chunks}}
    runs = {}
    for name in arms:
        model = copy.deepcopy(base)
        runs[name] = (model, build_optimizer(list(model.parameters()), lr=1e-4)[0], [], [])
    for step in range(args.demo_warmup + args.demo_steps):
        for name, chunk in arms.items():
            model, optimizer, wall, cpu = runs[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, optimizer, [batches[step % len(batches)]], objective, 1.0, chunk_positions=chunk)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= args.demo_warmup:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    return {name: {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "steps_s": wall, "steps_cpu_s": cpu}
            for name, (_, _, wall, cpu) in runs.items()}


def ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if a.get(key) and b.get(key) else None


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    key = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    memory = {}
    for arm in ARMS:
        print(f"{arm} ...", flush=True)
        memory[arm] = memory_arm(args, arm)
    ratios = {"kd_over_ce_chunked": ratio(memory["kd_chunked"], memory["ce_chunked"], key),
              "kd_over_ce_whole": ratio(memory["kd_whole"], memory["ce_whole"], key),
              "kd_whole_over_kd_chunked": ratio(memory["kd_whole"], memory["kd_chunked"], key)}
    demo = demo_times(args) if args.demo_steps else {}
    demo_ratios = {f"{name}_over_whole": {k: demo[name][k] / demo["whole"][k] for k in ("step_s", "cpu_s")}
                   for name in demo if name != "whole"}
    result = {
        "benchmark": "chunked_loss",
        "setup": {"vocab": args.vocab, "seq_len": args.seq_len, "rows": args.rows, "k": args.k, "chunk": args.chunk,
                  "student": TINY, "objectives": OBJECTIVES, "memory_key": key, "device": args.device,
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "demo": {"student": demo_shape(args), "batch": [4, 128], "k": 32, "objective": OBJECTIVES["kd"],
                           "steps": args.demo_steps, "warmup": args.demo_warmup}},
        "memory": memory, "ratios": ratios, "demo": demo, "demo_ratios": demo_ratios,
        "targets": {"kd_over_ce_chunked": "<= 1.15", "chunked_over_whole (demo step time)": "<= 1.0 (within noise)"},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    key = result["setup"]["memory_key"]
    s = result["setup"]
    print(f"\none step, V = {s['vocab']:,}, T = {s['seq_len']:,}, batch {s['rows']}, chunk {s['chunk']} ({key}):")
    print(f"{'arm':<12} {'peak MB':>9} {'before step MB':>15} {'step s':>7} {'CPU s':>7}")
    for arm, r in result["memory"].items():
        if "peak_rss_mb" not in r:
            print(f"{arm:<12} {'-':>9} {'':>15} {'':>7}  {r.get('skipped') or 'failed'}")
            continue
        print(f"{arm:<12} {r[key]:>9.0f} {r['rss_before_step_mb']:>15.0f} {r['step_s']:>7.2f} {r['cpu_s']:>7.2f}")
    for name, value in result["ratios"].items():
        print(f"{name:<26} {'-' if value is None else f'{value:.3f}'}")
    if result["demo"]:
        layers = result["setup"]["demo"]["student"]["num_hidden_layers"]
        print(f"\ndemo shape (SmolLM2-135M widths, {layers} layers, 4 x 128 tokens, 0.5 forward KL + 0.5 CE), medians:")
        print(f"{'arm':<14} {'wall s':>7} {'/whole':>7} {'CPU s':>7} {'/whole':>7}")
        for name, r in result["demo"].items():
            over = result["demo_ratios"].get(f"{name}_over_whole", {"step_s": 1.0, "cpu_s": 1.0})
            print(f"{name:<14} {r['step_s']:>7.3f} {over['step_s']:>7.3f} {r['cpu_s']:>7.3f} {over['cpu_s']:>7.3f}")


if __name__ == "__main__":
    main()
