"""GLMD's vocabulary map on the real teacher: what the seed's nearest-kept-id mapping does to SmolLM2.

Reads the soft-label caches of the shipped ``glmd_vocab`` config (BBC, SmolLM2-135M; label them
first with ``raykd distill --method glmd_vocab`` or ``raykd label``), counts the token ids of the
train split as the run does (:func:`raykd.students.vocab.token_counts`), keeps the N most
frequent ids and maps every other id onto its nearest kept id by the teacher's input embeddings
(:func:`raykd.students.vocab.build_vocab_map`), for each similarity mapping. Reported: how many
ids are mapped and onto how many kept ids, the largest groups, the share of train and held-out
tokens whose id is not kept, the teacher's top-k probability mass on ids that are not kept (what
the mapping moves during training), the most frequent mapped held-out tokens (decoded), how often
``cosine`` and ``euclidean`` agree with ``decoder``, and the search's time and peak extra memory
(resident set sampled every 5 ms over the level before the search, after one warm-up matmul and
with the freed heap trimmed).

    python benchmarks/bench_glmd_vocab_map.py --size 8192 --out benchmarks/results/glmd_vocab_map.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time
from pathlib import Path

import numpy as np


def split_stats(files: list[str], vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[V] counts of the split's real tokens, [V] teacher top-k probability summed over scored
    positions, and [V] how often each id is the teacher's top-1 there."""
    from raykd.soft_labels.cache import iter_cache_batches

    counts, mass, top1 = (np.zeros(vocab_size, dtype=np.float64) for _ in range(3))
    for b in iter_cache_batches(files, 256):
        counts += np.bincount(b["input_ids"][b["attention_mask"].astype(bool)], minlength=vocab_size)
        m = b["loss_mask"].astype(bool)
        ids, probs = b["topk_ids"][m], np.exp(b["topk_logprobs"][m].astype(np.float64))
        mass += np.bincount(ids.ravel(), weights=probs.ravel(), minlength=vocab_size)
        top1 += np.bincount(ids[:, 0], minlength=vocab_size)
    return counts, mass, top1


def split_files(plan, split: str) -> list[str]:
    from raykd.soft_labels.cache import (
        CacheError,
        cache_dir_for,
        open_cache,
        shard_paths,
    )

    folder = cache_dir_for(plan.cache_root, plan.keys[split])
    try:
        return shard_paths(folder, open_cache(folder, expect=plan.keys[split]))
    except CacheError as e:
        raise SystemExit(f"no {split} soft-label cache at {folder}: label it first "
                         "(raykd distill --method glmd_vocab --output-dir runs/glmd_vocab)") from e


class PeakRSS:
    """Peak resident set above the level at entry, sampled every 5 ms (Linux ``/proc``)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra_mb = (self.peak - self.base) / 2**20

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dropped_mask(vmap) -> np.ndarray:
    """[V] True for the ids that do not keep an entry of their own."""
    dropped = np.ones(len(vmap.table), dtype=bool)
    dropped[vmap.heads[vmap.heads >= 0]] = False
    return dropped


def split_on_dropped(stats: tuple, dropped: np.ndarray) -> dict:
    """What the ids that are not kept hold of one split: its real tokens, the teacher's top-k
    probability per scored position, the teacher's top-1."""
    counts, mass, top1 = stats
    return {"tokens": int(counts.sum()), "tokens_not_kept": int(counts[dropped].sum()),
            "token_share_not_kept": round(float(counts[dropped].sum() / counts.sum()), 5),
            "teacher_topk_mass_on_dropped_per_position": round(float(mass[dropped].sum() / top1.sum()), 5),
            "teacher_top1_dropped_share": round(float(top1[dropped].sum() / top1.sum()), 5)}


def describe(vmap, held_out_counts: np.ndarray, tokenizer, examples: int) -> dict:
    """One map's groups, and the most frequent held-out tokens it maps (decoded)."""
    heads, dropped = vmap.heads, dropped_mask(vmap)
    members = np.bincount(vmap.table, minlength=vmap.size) - 1  # mapped ids per kept id

    def tok(i):
        return tokenizer.decode([int(i)])

    counts = held_out_counts
    seen = np.flatnonzero(dropped & (counts > 0))
    seen = seen[np.lexsort((seen, -counts[seen]))]
    return {
        "dropped_ids": int(dropped.sum()),
        "kept_ids_receiving_mapped_ids": int((members > 0).sum()),
        "largest_groups": [{"kept": tok(heads[e]), "kept_id": int(heads[e]), "mapped_ids": int(members[e])}
                           for e in np.argsort(-members, kind="stable")[:5]],
        "examples": [{"dropped": tok(i), "dropped_id": int(i), "held_out_count": int(counts[i]),
                      "kept": tok(heads[vmap.table[i]]), "kept_id": int(heads[vmap.table[i]])} for i in seen[:examples]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=8192, help="N, or a fraction of V")
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/glmd_vocab_map.json")
    args = ap.parse_args()

    import torch

    from raykd.config import DistillConfig, load_config
    from raykd.methods import get_method
    from raykd.models import load_tokenizer
    from raykd.soft_labels.plan import Plan
    from raykd.students.vocab import (
        build_vocab_map,
        input_embeddings,
        resolve_vocab_size,
        token_counts,
    )

    cfg = load_config(DistillConfig, get_method("glmd_vocab").config_path)
    plan = Plan(cfg)
    tokenizer = load_tokenizer(plan.teacher_path)
    emb = input_embeddings(plan.teacher_path)
    v = emb.shape[0]
    n = resolve_vocab_size(int(args.size) if args.size >= 1 else args.size, v)
    train_files, eval_files = split_files(plan, "train"), split_files(plan, "eval")
    counts = token_counts(train_files, v)  # what the run ranks ids by
    train, held_out = split_stats(train_files, v), split_stats(eval_files, v)
    assert (train[0] == counts).all()

    maps, result = {}, {}
    _ = torch.randn(2048, emb.shape[1]) @ emb[:n].T  # load the BLAS code and threads before measuring
    for mapping in ("decoder", "cosine", "euclidean"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            maps[mapping] = build_vocab_map(counts, n, mapping, emb)
        result[mapping] = {"search_s": round(time.perf_counter() - t0, 2), "search_extra_rss_mb": round(mem.extra_mb, 1),
                           **describe(maps[mapping], held_out[0], tokenizer, args.examples)}
        if mapping != "decoder":
            mapped = maps["decoder"].table[~np.isin(np.arange(v), maps["decoder"].heads)]
            same = maps[mapping].table[~np.isin(np.arange(v), maps["decoder"].heads)] == mapped
            result[mapping]["same_kept_id_as_decoder"] = round(float(same.mean()), 4)
    norms = emb.norm(dim=-1)
    report = {
        "teacher": cfg.teacher.model, "vocab_size": v, "size": n, "embedding": list(emb.shape),
        "data": {"source": cfg.data.source, "sample": cfg.data.sample, "splits": cfg.data.splits,
                 "seq_len": cfg.data.seq_len, "max_blocks_per_doc": cfg.data.max_blocks_per_doc},
        "caches": {"train": plan.keys["train"].digest(), "eval": plan.keys["eval"].digest()},
        "train_tokens": int(counts.sum()), "distinct_train_ids": int((counts > 0).sum()),
        "kept_ids_unseen_in_train": int(max(0, n - (counts > 0).sum())),
        "not_kept": {"train": split_on_dropped(train, dropped_mask(maps["decoder"])),  # one kept set for all mappings
                     "held_out": split_on_dropped(held_out, dropped_mask(maps["decoder"]))},
        "embedding_norm_quantiles": {q: round(float(norms.quantile(float(q))), 3) for q in ("0.5", "0.99", "1.0")},
        "torch_threads": torch.get_num_threads(), "mappings": result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_table(report)
    print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    tr, ho = report["not_kept"]["train"], report["not_kept"]["held_out"]
    print(f"{report['teacher']}: V={report['vocab_size']:,} -> N={report['size']:,} kept ids; train split "
          f"{report['train_tokens']:,} tokens, {report['distinct_train_ids']:,} distinct ids "
          f"({report['kept_ids_unseen_in_train']:,} kept ids unseen in train)")
    for name, r in (("train", tr), ("held-out", ho)):
        print(f"  {name}: tokens not kept {r['token_share_not_kept']:.2%}, teacher top-k mass on ids not kept "
              f"{r['teacher_topk_mass_on_dropped_per_position']:.2%} per position, teacher top-1 not kept "
              f"{r['teacher_top1_dropped_share']:.2%}")
    print(f"{'mapping':<10} {'mapped ids':>10} {'onto kept ids':>13} {'largest group':>24} {'same as decoder':>15} "
          f"{'search s':>8} {'extra MB':>8}")
    for mapping, r in report["mappings"].items():
        g = r["largest_groups"][0]
        print(f"{mapping:<10} {r['dropped_ids']:>10,} {r['kept_ids_receiving_mapped_ids']:>13,} "
              f"{g['mapped_ids']:>9,} -> {g['kept']!r:<12} {r.get('same_kept_id_as_decoder', 1.0):>15.3f} "
              f"{r['search_s']:>8} {r['search_extra_rss_mb']:>8}")
    print("decoder map, the most frequent held-out tokens that are not kept:")
    for e in report["mappings"]["decoder"]["examples"]:
        print(f"  {e['dropped']!r} ({e['held_out_count']}x) -> {e['kept']!r}")


if __name__ == "__main__":
    main()
