"""MiniDisc's pick against MaxiDisc's best on a decoder LM, and the lambda sweep, from finished runs.

Reads the ``results.json`` of ``raykd tune minidisc`` and ``raykd tune maxidisc`` (``task: lm``,
same config); prints a table and writes a JSON summary:
per search the path picked, the student's held-out perplexity, trials and wall time; MaxiDisc's
best over paths of length 1 and of length <= 2; which TA each lambda of MiniDisc's sweep picks
and the student perplexity MaxiDisc measured for that TA's path.

    python benchmarks/bench_lm_schedule.py --minidisc runs/lm_minidisc --maxidisc runs/lm_maxidisc \
        --out tune/results/lm_summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarise(mini: dict[str, Any], maxi: dict[str, Any]) -> dict[str, Any]:
    """The comparison as a dict (see the module docstring)."""
    by_path = {r["path"]: r for r in maxi["candidates"]}
    student = maxi["candidates"][0]["path"].split(" > ")[-1]
    sweep = []
    for pick in mini["lambda_sweep"]:
        path = f"{_hop(pick['ta_sparsity'], student)} > {student}"
        sweep.append({"lambda": pick["lambda"], "minidisc_ta": pick["ta_sparsity"], "path": path,
                      "maxidisc_student_ppl": by_path.get(path, {}).get("student_ppl"),
                      "is_maxidisc_best": maxi["best"] is not None and path == maxi["best"]["path"]})
    out = {
        "teacher_heldout_ppl": maxi["teacher"]["heldout_ppl"],
        "minidisc": {"path": mini["best"]["path"], "student_ppl": mini["best"]["student_ppl"], "trials": mini["trials_run"],
                     "wall_s": mini["wall_s"], "lambda": mini["lambda_tradeoff"], "sandwich": mini["candidates"]},
        "maxidisc": {"best": maxi["best"], "best_length_1": maxi["best_up_to_length"].get("1"),
                     "best_length_le_2": maxi["best_up_to_length"].get("2"), "trials": maxi["trials_run"], "wall_s": maxi["wall_s"],
                     "paths": [{k: r[k] for k in ("path", "student_ppl", "status")} for r in maxi["candidates"]]},
        "lambda_sweep": sweep,
    }
    return out


def _hop(sparsity: float, student: str) -> str:
    layers = student.split("L")[0] if "L" in student else None
    return f"{layers}L+{sparsity:g}" if layers else f"{sparsity:g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minidisc", required=True)
    p.add_argument("--maxidisc", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    load = lambda d: json.loads((Path(d) / "results.json").read_text())
    out = summarise(load(a.minidisc), load(a.maxidisc))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    m, x = out["minidisc"], out["maxidisc"]
    print(f"teacher held-out ppl {out['teacher_heldout_ppl']:.2f}")
    print(f"MiniDisc: {m['path']:<24} student ppl {m['student_ppl']:.2f}  trials {m['trials']}  wall {m['wall_s']:.0f} s")
    for r in x["paths"]:
        print(f"MaxiDisc: {r['path']:<24} student ppl {r['student_ppl']}  ({r['status']})")
    print(f"MaxiDisc best: {x['best']['path'] if x['best'] else None}  trials {x['trials']}  wall {x['wall_s']:.0f} s")
    for r in out["lambda_sweep"]:
        print(f"lambda {r['lambda']:>5}: TA {r['minidisc_ta']}  MaxiDisc student ppl {r['maxidisc_student_ppl']}  best={r['is_maxidisc_best']}")

if __name__ == "__main__":
    main()
