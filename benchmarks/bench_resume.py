"""Resume after a kill: label, SIGKILL the driver at about half of the parts, label again.

All three runs are `raykd label` drivers joined to one Ray cluster, with a tiny teacher: (1) the
run that is killed once half of the train parts are in the ledger, (2) the rerun, (3) an
uninterrupted run into another cache folder. The rerun must make at most 55% of the
uninterrupted run's teacher calls, and the resumed cache must equal the uninterrupted one:
identical token and top-k ids, log-probs within one fp16 ulp.

    python benchmarks/bench_resume.py --docs 2000 --part-docs 100 --out runs/bench_resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABEL = "import sys; from raykd.cli import cli; sys.exit(cli(sys.argv[1:]))"


def label(cfg_file: Path, env: dict, kill_at_parts: int | None = None, ledger: str | None = None) -> dict | None:
    """Run `raykd label`; with ``kill_at_parts``, SIGKILL it once the ledger holds that many parts."""
    from raykd.soft_labels.cache import done_parts

    proc = subprocess.Popen([sys.executable, "-c", LABEL, "label", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    if kill_at_parts is None:
        out, _ = proc.communicate(timeout=3600)
        return json.loads(out[out.index("{"):])
    while len(done_parts(ledger)) < kill_at_parts:
        if proc.poll() is not None:
            raise RuntimeError("the labeling driver finished before it could be killed; use more documents")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def sorted_decoded(folder: str) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raykd.soft_labels.cache import open_cache, shard_paths
    from raykd.soft_labels.schema import decode_batch

    table = pa.concat_tables([pq.read_table(f) for f in shard_paths(folder, open_cache(folder))])
    table = table.take(pc.sort_indices(table, sort_keys=[("doc_id", "ascending"), ("block_index", "ascending")]))
    return decode_batch(table, with_ids=True)


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    real = a["attention_mask"].astype(bool)
    same_rows = list(a["doc_id"]) == list(b["doc_id"]) and len(set(a["doc_id"])) == len(a["doc_id"])
    ids_equal = bool((a["input_ids"] == b["input_ids"]).all() and (a["topk_ids"][real] == b["topk_ids"][real]).all())
    x, y = a["topk_logprobs"][real].astype(np.float32), b["topk_logprobs"][real].astype(np.float32)
    ulp = np.spacing(np.abs(y).astype(np.float16)).astype(np.float32)  # one fp16 ulp at each value
    return {"rows": len(a["doc_id"]), "same_rows": same_rows, "ids_identical": ids_equal,
            "max_abs_logprob_diff": float(np.abs(x - y).max()), "within_one_fp16_ulp": bool((np.abs(x - y) <= ulp).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--part-docs", type=int, default=100)
    p.add_argument("--out", default="bench_resume.json")
    args = p.parse_args()

    import ray
    import yaml

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_driver_memory import write_corpus
    from raykd.config import DistillConfig
    from raykd.soft_labels.cache import cache_dir_for, done_parts
    from raykd.soft_labels.plan import Plan
    from tests.conftest import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="raykd-bench-resume-"))
    model = build_tiny_model(tmp / "tiny_teacher")
    write_corpus(tmp / "corpus", args.docs, args.part_docs)

    def config(cache: str) -> tuple[Path, DistillConfig]:
        cfg = DistillConfig.model_validate({
            "data": {"source": "jsonl", "path": str(tmp / "corpus"), "id_column": "id", "seq_len": 64, "min_tokens": 8,
                     "part_docs": args.part_docs},
            "teacher": {"name": "resume-teacher", "model": str(model), "num_threads": 1, "num_cpus": 0.5},
            "labels": {"k": 8, "batch_size": 16, "cache_dir": str(tmp / cache), "num_labelers": 1},
            "student": {"keep_layers": [0, 3]}})
        path = tmp / f"{cache}.yaml"
        path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
        return path, cfg

    resumed_file, cfg = config("resumed")
    full_file, _ = config("full")
    plan = Plan(cfg)
    n_parts = len(plan.sources["train"][1])
    ledger = cache_dir_for(plan.cache_root, plan.keys["train"])

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    try:
        t0 = time.perf_counter()
        label(resumed_file, env, kill_at_parts=n_parts // 2, ledger=ledger)
        killed_s, done_at_kill = time.perf_counter() - t0, len(done_parts(ledger))
        t0 = time.perf_counter()
        rerun = label(resumed_file, env)
        rerun_s = time.perf_counter() - t0
        from raykd.teacher.apps import stop_teacher

        stop_teacher("resume-teacher")  # the killed run's teacher outlived its driver; the rerun reused it
        t0 = time.perf_counter()
        full = label(full_file, env)
        full_s = time.perf_counter() - t0
        same = {split: compare(sorted_decoded(rerun[split]["path"]), sorted_decoded(full[split]["path"])) for split in ("train", "eval")}
    finally:
        ray.shutdown()
    ratio = rerun["teacher_calls"] / full["teacher_calls"]
    result = {"benchmark": "resume", "docs": args.docs, "parts": n_parts, "parts_done_at_kill": done_at_kill,
              "killed_run_s": killed_s, "rerun_s": rerun_s, "full_s": full_s, "rerun_teacher_calls": rerun["teacher_calls"],
              "full_teacher_calls": full["teacher_calls"], "calls_ratio": ratio, "bound": 0.55, "compare": same,
              "holds": ratio <= 0.55 and all(c["ids_identical"] and c["within_one_fp16_ulp"] and c["same_rows"] for c in same.values())}
    print(f"\n{'run':<24} {'seconds':>8} {'teacher calls':>14}")
    print(f"{'killed at ' + str(done_at_kill) + '/' + str(n_parts) + ' parts':<24} {killed_s:>8.1f} {'-':>14}")
    print(f"{'rerun (resume)':<24} {rerun_s:>8.1f} {rerun['teacher_calls']:>14}")
    print(f"{'uninterrupted':<24} {full_s:>8.1f} {full['teacher_calls']:>14}")
    for split, c in same.items():
        print(f"{split}: {c['rows']} rows, same rows {c['same_rows']}, ids identical {c['ids_identical']}, "
              f"max |dlogprob| {c['max_abs_logprob_diff']:.2e}, within one fp16 ulp {c['within_one_fp16_ulp']}")
    print(f"rerun / uninterrupted teacher calls: {ratio:.3f} (bound 0.55): {'holds' if result['holds'] else 'DOES NOT HOLD'}")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
