"""``benchmarks/bench_peers.py --quick`` runs end to end against TRL, and its comparison is fair:
raykd's online forward-KL step and TRL's GKDTrainer (lmbda 0, beta 0) train the same student."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("trl.experimental.gkd", reason="TRL is not installed: it comes with the bench extra (pip install -e '.[bench]')")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_peers.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_peer_run_matches_trl_at_the_same_objective(tmp_path):
    out = tmp_path / "peers.json"
    result = load_script().main(["--quick", "--rss-steps", "1", "--segment", "2", "--out", str(out)])
    assert json.loads(out.read_text())["ratio_to_trl"] == result["ratio_to_trl"]
    arms = result["arms"]
    assert set(arms) == {"student_init", "raykd_cached", "raykd_online", "trl_gkd"}
    for name in ("raykd_cached", "raykd_online", "trl_gkd"):
        r = arms[name]
        assert r["steps"] == 6 and r["step_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["end_to_end_s"]["4"] > r["end_to_end_s"]["1"]
    assert arms["raykd_cached"]["labeling_s"] > 0
    # same init, blocks, order, optimizer, schedule and objective (full-vocabulary forward KL):
    # the two trained students agree, and training moved them away from the init
    trl, online = arms["trl_gkd"]["eval"], arms["raykd_online"]["eval"]
    assert online["ppl"] == pytest.approx(trl["ppl"], rel=1e-3)
    assert online["top1_agreement"] == pytest.approx(trl["top1_agreement"], abs=1e-6)
    assert online["ppl"] != arms["student_init"]["eval"]["ppl"]
    assert set(result["ratio_to_trl"]) == {"raykd_cached", "raykd_online"}
