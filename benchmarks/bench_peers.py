"""raykd beside TRL's ``GKDTrainer``: step time, end-to-end time, held-out quality, peak RSS.

Three arms train the same student init on the same blocks, in the same batch order, with the
same optimizer (AdamW, ``raykd.train.step.build_optimizer``: linear warm-up, cosine decay to 0.1
of the peak), gradient clipping at 1.0 and the same number of steps:

- ``raykd_cached``: raykd's Ray-free step (:func:`raykd.train.step.train_step`) on cached top-k
  soft labels. Labeling runs once before training (teacher forward + ``topk_with_tail``, kept as
  the cache keeps them: fp16 log-probs) and is timed apart, so end-to-end times amortise it.
- ``raykd_online``: the same step with the teacher in the process (``train.online_teacher``):
  dense targets from a no-grad teacher forward every step.
- ``trl_gkd``: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with ``lmbda=0`` (never
  on-policy: the dataset's blocks every step), ``seq_kd=False`` and ``beta=0``. TRL's
  ``generalized_jsd_loss`` with ``beta=0`` is ``F.kl_div(student_logp, teacher_logp)``, i.e.
  the forward KL(teacher || student) over the full vocabulary at temperature 1 (its
  ``temperature`` argument is only the sampling temperature of on-policy generation), averaged
  over the valid tokens, with no CE term. raykd's ``{forward_kl: 1.0}`` at ``temperature=1`` is
  the same objective (``--objective kl``, the default); ``--objective kl_ce`` gives the demo's
  0.5 forward KL + 0.5 CE to the raykd arms only.

The arms alternate in segments of ``--segment`` steps inside one process (TRL's own train loop
drives; a callback runs the raykd arms' segments between its steps, off TRL's clock), so machine
noise hits all of them alike. One function evaluates every final student on the held-out blocks:
perplexity and top-1 agreement with the teacher. Peak RSS comes from a fresh subprocess per arm
running ``--rss-steps`` steps (the cached arm loads the student and the labels, not the teacher).

End-to-end times for 1 and 4 students from one teacher are composed from measured parts: each
student pays its start-up and its steps; the cached arm pays labeling once. The full Ray job
(Serve labeling, Parquet cache, Ray Train, checkpoints) adds Ray's own start-up and I/O on top
of the cached arm's step; ``bench_labeling.py`` and ``bench_training.py`` measure those.

    python benchmarks/bench_peers.py --out peers_smollm2.json                      # real teacher
    python benchmarks/bench_peers.py --teacher-layers 60 --out peers_deep60.json   # deeper, random weights
    python benchmarks/bench_peers.py --quick --out /tmp/peers_quick.json           # tiny smoke run, seconds

TRL comes from the ``bench`` extra (``pip install -e ".[bench]"``, TRL 1.16.0; it resolves
against raykd's pins). Without TRL the raykd arms run alone and the JSON says why TRL is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental: we know
ARMS = ("raykd_cached", "raykd_online", "trl_gkd")
OBJECTIVES = {"kl": {"forward_kl": 1.0}, "kl_ce": {"forward_kl": 0.5, "ce": 0.5}}
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_setup import Setup, real_setup, synthetic_setup  # noqa: E402  (what every arm shares)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/bbc_smollm2.yaml", help="the demo's job config: data, student, budget")
    p.add_argument("--teacher-layers", type=int, default=None,
                   help="a deeper teacher from SmolLM2's config with this many layers, random weights (timing only)")
    p.add_argument("--steps", type=int, default=None, help="default: the config's train.max_steps")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    p.add_argument("--train-blocks", type=int, default=None, help="use only the first N train blocks (check runs)")
    p.add_argument("--held-out-blocks", type=int, default=None, help="use only the first N held-out blocks (check runs)")
    p.add_argument("--segment", type=int, default=5, help="steps of one arm before the next arm's turn")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="kl", help="the raykd arms' loss (TRL: forward KL)")
    p.add_argument("--k", type=int, default=None, help="cached top-k (default: the config's labels.k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--students", type=int, nargs="+", default=[1, 4], help="end-to-end times for this many students")
    p.add_argument("--rss-steps", type=int, default=3, help="steps of each arm's peak-RSS subprocess (0: skip)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--quick", action="store_true", help="a tiny model built from a config and random blocks: a smoke run")
    p.add_argument("--synthetic", action="store_true",
                   help="SmolLM2-135M's shape with random weights and random blocks at the demo's sizes (no model or data files)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    p.add_argument("--out", default="bench_peers.json")
    p.add_argument("--rss-arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one arm in a fresh process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)



def rows(data: dict[str, np.ndarray], idx: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v[idx]).to(device) for k, v in data.items()}


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a step's clock stops when its kernels are done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def label(teacher: torch.nn.Module, train: dict[str, np.ndarray], k: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Top-k soft labels of every train block, as the cache keeps them (fp16 log-probs)."""
    from raykd.teacher.engines import topk_with_tail

    parts: dict[str, list[torch.Tensor]] = {"topk_logprobs": [], "topk_ids": [], "tail_logmass": []}
    for s in range(0, len(train["input_ids"]), batch_size):
        b = rows(train, np.arange(s, min(s + batch_size, len(train["input_ids"]))), device_of(teacher))
        lp, ids, tail = topk_with_tail(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, k, 1.0)
        for name, v in zip(parts, (lp.half(), ids.int(), tail)):
            parts[name].append(v.cpu())  # the cache lives on the host
    return {name: torch.cat(v) for name, v in parts.items()}


class RaykdArm:
    """A raykd student trained one step at a time with raykd's own step and optimizer."""

    def __init__(self, setup: Setup, weights: dict[str, float], labels: dict[str, torch.Tensor] | None,
                 teacher: torch.nn.Module | None) -> None:
        from raykd.losses import Objective, TeacherTargets
        from raykd.train.step import build_optimizer

        start = time.perf_counter()
        self.setup, self.labels, self.step_s, self.done = setup, labels, [], 0
        self.model = copy.deepcopy(setup.student).train()
        d = setup.describe
        self.optimizer, self.scheduler = build_optimizer(list(self.model.parameters()), lr=d["lr"], schedule="cosine",
                                                         warmup=d["warmup_steps"], total=d["steps"])
        self.objective = Objective(weights)
        self.teacher_fn = None
        if teacher is not None:
            def teacher_fn(batch):
                with torch.no_grad():
                    return TeacherTargets.dense(teacher(**batch.inputs).logits)
            self.teacher_fn = teacher_fn
        self.startup_s = time.perf_counter() - start

    def batch(self, idx: np.ndarray):
        from raykd.train.loop import batch_to_inputs
        from raykd.train.step import StudentBatch

        device = device_of(self.model)
        b = rows(self.setup.train, idx, device)
        if self.labels is not None:
            b.update({k: v[torch.as_tensor(idx)].to(device) for k, v in self.labels.items()})
        else:  # online: batch_to_inputs reads the label columns; the teacher replaces the targets
            shape = b["input_ids"].shape
            b.update(topk_ids=torch.zeros(*shape, 1, device=device), topk_logprobs=torch.zeros(*shape, 1, device=device),
                     tail_logmass=torch.zeros(*shape, device=device))
        ids, am, labels, mask, targets = batch_to_inputs(b)
        return StudentBatch({"input_ids": ids, "attention_mask": am}, labels, mask, targets if self.labels is not None else None)

    def run(self, n: int) -> None:
        from raykd.train.step import train_step

        for _ in range(n):
            if self.done >= len(self.setup.order):
                return
            start = time.perf_counter()
            train_step(self.model, self.optimizer, [self.batch(self.setup.order[self.done])], self.objective, 1.0,
                       scheduler=self.scheduler, max_grad_norm=1.0, teacher=self.teacher_fn)
            sync(device_of(self.model))
            self.step_s.append(time.perf_counter() - start)
            self.done += 1


def trl_available() -> str | None:
    """None when TRL's GKDTrainer imports, else why not."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: F401
    except Exception as e:  # ImportError, or a TRL that does not match this transformers
        return f"trl's GKDTrainer does not import ({type(e).__name__}: {e}); install the bench extra: pip install -e '.[bench]'"
    return None


def trl_trainer(setup: Setup, workdir: Path, on_segment=None, segment: int = 1):
    """TRL's GKDTrainer (lmbda 0, beta 0) over the blocks in ``setup.order``, raykd's optimizer.

    Returns:
        ``(trainer, step_s list, startup_s)``; ``on_segment`` is called after every ``segment``
        steps, off the step clock.
    """
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from raykd.train.step import build_optimizer

    start = time.perf_counter()
    d = setup.describe
    idx = setup.order.reshape(-1)
    ids, am, mask = (setup.train[k][idx] for k in ("input_ids", "attention_mask", "loss_mask"))
    labels = np.where(mask.astype(bool), ids, -100)  # TRL shifts: position t is scored against token t + 1
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": am.tolist(), "labels": labels.tolist()})

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.tensor([row[k] for row in batch]) for k in ("input_ids", "attention_mask", "labels")}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the blocks in the raykd arms' order
            return SequentialSampler(self.train_dataset)

    step_s: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device_of(setup.student))
            step_s.append(time.perf_counter() - self.t0)
            if on_segment is not None and state.global_step % segment == 0:
                on_segment()

    model = copy.deepcopy(setup.student).train()
    optimizer, scheduler = build_optimizer(list(model.parameters()), lr=d["lr"], schedule="cosine",
                                           warmup=d["warmup_steps"], total=d["steps"])
    config = GKDConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=d["batch_size"], max_steps=d["steps"],
                       lmbda=0.0, beta=0.0, seq_kd=False, max_grad_norm=1.0, learning_rate=d["lr"], logging_steps=10**6,
                       save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
                       use_cpu=device_of(setup.student).type == "cpu", bf16=False, fp16=False)
    trainer = InOrder(model=model, teacher_model=setup.teacher, args=config, data_collator=collate, train_dataset=data,
                      processing_class=setup.tokenizer, optimizers=(optimizer, scheduler), callbacks=[Clock()])
    return trainer, step_s, time.perf_counter() - start


@torch.inference_mode()
def evaluate(model: torch.nn.Module, held_out: dict[str, np.ndarray], teacher_top1: torch.Tensor, batch_size: int = 16) -> dict:
    """Held-out perplexity and top-1 agreement with the teacher over ``loss_mask`` positions."""
    model.eval()
    nll, agree, n = 0.0, 0, 0
    for s in range(0, len(held_out["input_ids"]), batch_size):
        b = rows(held_out, np.arange(s, min(s + batch_size, len(held_out["input_ids"]))), device_of(model))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        m = b["loss_mask"][:, 1:].bool() & b["loss_mask"][:, :-1].bool()
        tok_lp = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        nll -= float(tok_lp[m].double().sum())
        agree += int((logits.argmax(-1) == teacher_top1[s : s + len(logits)].to(logits.device))[m].sum())
        n += int(m.sum())
    return {"ppl": float(np.exp(nll / max(n, 1))), "top1_agreement": agree / max(n, 1), "tokens": n}


@torch.inference_mode()
def teacher_top1(teacher: torch.nn.Module, held_out: dict[str, np.ndarray], batch_size: int = 16) -> torch.Tensor:
    out = []
    for s in range(0, len(held_out["input_ids"]), batch_size):
        b = rows(held_out, np.arange(s, min(s + batch_size, len(held_out["input_ids"]))), device_of(teacher))
        out.append(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].argmax(-1))
    return torch.cat(out)


def pick(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)


def save_workdir(setup: Setup, labels: dict[str, torch.Tensor] | None, workdir: Path) -> None:
    """What an arm's peak-RSS subprocess loads: the models, blocks, batch order and labels."""
    setup.teacher.save_pretrained(workdir / "teacher")
    setup.student.save_pretrained(workdir / "student")
    setup.tokenizer.save_pretrained(workdir / "student")
    np.savez(workdir / "blocks.npz", order=setup.order, **setup.train)
    (workdir / "describe.json").write_text(json.dumps(setup.describe))
    if labels is not None:
        torch.save(labels, workdir / "labels.pt")


def rss_child(args: argparse.Namespace) -> None:
    """Run ``--rss-steps`` steps of one arm from ``--workdir`` and print its peak RSS (MB)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = Path(args.workdir)
    blocks = dict(np.load(workdir / "blocks.npz"))
    order = blocks.pop("order")[: args.rss_steps]
    describe = {**json.loads((workdir / "describe.json").read_text()), "steps": len(order)}
    cached = args.rss_arm == "raykd_cached"
    device = pick(args.device)
    teacher = None if cached else AutoModelForCausalLM.from_pretrained(workdir / "teacher").eval().to(device)
    student = AutoModelForCausalLM.from_pretrained(workdir / "student").to(device)
    setup = Setup(teacher, student, blocks, {}, order, 0.0, describe, AutoTokenizer.from_pretrained(workdir / "student"))
    if args.rss_arm == "trl_gkd":
        with tempfile.TemporaryDirectory() as tmp:
            trl_trainer(setup, Path(tmp))[0].train()
    else:
        labels = torch.load(workdir / "labels.pt") if cached else None
        RaykdArm(setup, OBJECTIVES[args.objective], labels, teacher).run(len(order))
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu}))


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` of its own address space (``ru_maxrss`` survives
    ``exec`` and would report the forking parent's size in a child), else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(args: argparse.Namespace, arm: str, workdir: Path) -> dict:
    """Peak RSS (and peak GPU memory on CUDA) of a fresh process running ``--rss-steps`` of ``arm``."""
    cmd = [sys.executable, __file__, "--rss-arm", arm, "--workdir", str(workdir), "--rss-steps", str(args.rss_steps),
           "--objective", args.objective, "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"peak RSS of {arm} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"peak_rss_mb": None, "peak_gpu_mb": None, "error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(step_s: list[float], startup_s: float, labeling_s: float, teacher_load_s: float, students: list[int]) -> dict:
    """Step time with and without start-up, and end-to-end seconds for ``n`` students: each student
    loads its teacher (not the cached arm, which loads it once to label) and pays start-up and steps."""
    train_s = sum(step_s)
    per_student = startup_s + train_s + (0.0 if labeling_s else teacher_load_s)
    once = teacher_load_s + labeling_s if labeling_s else 0.0
    return {"steps": len(step_s), "step_s": statistics.median(step_s), "first_step_s": step_s[0], "train_s": train_s,
            "startup_s": startup_s, "step_s_with_startup": (startup_s + train_s) / len(step_s), "labeling_s": labeling_s,
            "end_to_end_s": {str(n): once + n * per_student for n in students}}


def interleave(args: argparse.Namespace, setup: Setup, arms: list[str], labels, workdir: Path) -> dict[str, dict]:
    """Train every arm in alternating segments; return each arm's step times, start-up and model."""
    weights = OBJECTIVES[args.objective]
    raykd = {}
    if "raykd_cached" in arms:
        raykd["raykd_cached"] = RaykdArm(setup, weights, labels, None)
    if "raykd_online" in arms:
        raykd["raykd_online"] = RaykdArm(setup, weights, None, setup.teacher)

    def segment() -> None:
        for arm in raykd.values():
            arm.run(args.segment)

    out = {}
    if "trl_gkd" in arms:
        trainer, step_s, startup_s = trl_trainer(setup, workdir, segment, args.segment)
        start = time.perf_counter()
        before = sum(sum(a.step_s) for a in raykd.values())
        trainer.train()
        inside = sum(sum(a.step_s) for a in raykd.values()) - before
        loop_overhead = time.perf_counter() - start - inside - sum(step_s)  # dataloader, accelerate, callbacks
        out["trl_gkd"] = {"step_s": step_s, "startup_s": startup_s + loop_overhead, "model": trainer.model}
    while any(a.done < len(setup.order) for a in raykd.values()):
        segment()
    for name, arm in raykd.items():
        out[name] = {"step_s": arm.step_s, "startup_s": arm.startup_s, "model": arm.model}
    return out


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.rss_arm:
        return rss_child(args)
    setup = synthetic_setup(args) if args.quick or args.synthetic else real_setup(args)
    device = pick(args.device)
    setup.teacher.to(device), setup.student.to(device)
    d = setup.describe
    trl_missing = trl_available() if "trl_gkd" in args.arms else "not requested (--arms)"
    arms = [a for a in args.arms if a != "trl_gkd" or trl_missing is None]
    labels, labeling_s = None, 0.0
    if "raykd_cached" in arms:
        start = time.perf_counter()
        labels = label(setup.teacher, setup.train, d["k"])
        labeling_s = time.perf_counter() - start
    print(f"teacher {d['teacher']}: {len(setup.train['input_ids'])} train / {len(setup.held_out['input_ids'])} held-out blocks, "
          f"{d['steps']} steps of {d['batch_size']}; labeling {labeling_s:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = interleave(args, setup, arms, labels, Path(tmp))
        top1 = teacher_top1(setup.teacher, setup.held_out)
        results = {"student_init": {"eval": evaluate(setup.student, setup.held_out, top1)}}
        for name in arms:
            r = runs[name]
            results[name] = {**summarise(r["step_s"], r["startup_s"], labeling_s if name == "raykd_cached" else 0.0,
                                         setup.teacher_load_s, args.students),
                             "eval": evaluate(r["model"], setup.held_out, top1), "step_times": r["step_s"]}
        if args.rss_steps:
            save_workdir(setup, labels, Path(tmp))
            for name in arms:
                results[name].update(peak_memory(args, name, Path(tmp)))
    ratios = {}
    if "trl_gkd" in results:
        trl = results["trl_gkd"]
        for name in (a for a in arms if a != "trl_gkd"):
            ratios[name] = {"step_s": results[name]["step_s"] / trl["step_s"],
                            "step_s_with_startup": results[name]["step_s_with_startup"] / trl["step_s_with_startup"],
                            **{f"end_to_end_{n}": results[name]["end_to_end_s"][n] / trl["end_to_end_s"][n]
                               for n in trl["end_to_end_s"]}}
    result = {
        "benchmark": "peers",
        "setup": {**d, "objective_raykd": OBJECTIVES[args.objective], "objective_trl": "GKDTrainer lmbda=0 beta=0 (forward KL, full vocabulary)",
                  "segment": args.segment, "seed": args.seed, "quick": args.quick, "torch_threads": torch.get_num_threads(),
                  "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "teacher_load_s": setup.teacher_load_s, "rss_steps": args.rss_steps},
        "trl": {"version": __import__("trl").__version__} if trl_missing is None else {"skipped": trl_missing},
        "arms": results,
        "ratio_to_trl": ratios,
        "targets": {"raykd_cached end_to_end_4 / trl_gkd (deeper teacher)": "<= 0.5",
                    "raykd ppl / trl ppl at the same objective": "<= 1.02 (over 3 seeds, with sampled labels)"},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    n_keys = list(result["arms"].get("raykd_cached", result["arms"].get("raykd_online", {})).get("end_to_end_s", {}))
    head = f"{'arm':<13} {'step s':>7} {'/TRL':>5} {'s/step+start':>12} " + " ".join(f"{'e2e ' + n + ' st':>9}" for n in n_keys)
    print("\n" + head + f" {'ppl':>9} {'agree':>6} {'RSS MB':>7}")
    for name, r in result["arms"].items():
        if name == "student_init":
            print(f"{name:<13} {'':>7} {'':>5} {'':>12} " + " ".join(f"{'':>9}" for _ in n_keys) +
                  f" {r['eval']['ppl']:>9.1f} {r['eval']['top1_agreement']:>6.3f}")
            continue
        ratio = result["ratio_to_trl"].get(name, {}).get("step_s", 1.0 if name == "trl_gkd" else float("nan"))
        rss = r.get("peak_rss_mb")
        print(f"{name:<13} {r['step_s']:>7.3f} {ratio:>5.2f} {r['step_s_with_startup']:>12.3f} "
              + " ".join(f"{r['end_to_end_s'][n]:>9.1f}" for n in n_keys)
              + f" {r['eval']['ppl']:>9.1f} {r['eval']['top1_agreement']:>6.3f} {'-' if rss is None else str(round(rss)):>7}")
    if "skipped" in result["trl"]:
        print(f"trl_gkd skipped: {result['trl']['skipped']}")


if __name__ == "__main__":
    main()
