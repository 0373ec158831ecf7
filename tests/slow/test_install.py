"""A non-editable install works on its own: `pip install .` into a fresh virtualenv, then
`raykd methods` and a method run from its shipped config (package data, not the repo's files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with raykd installed from a copy of the sources (no editable hooks).

    Its dependencies come from the project environment through a ``.pth`` line (nothing is
    downloaded); the project environment's own editable raykd is not visible there, because a
    path added by a ``.pth`` line is not a site folder (its ``.pth`` hooks are not run).
    """
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "raykd", src / "raykd", ignore=shutil.ignore_patterns("__pycache__"))
    env = root / "venv"
    venv.create(env, with_pip=False)
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "_raykd_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", str(src)], check=True, cwd=root)
    return env


def test_installed_package_lists_methods_and_ships_their_configs(installed):
    py = str(installed / "bin" / "python")
    where = subprocess.run([py, "-c", "import raykd.methods as m; print(m.__file__); print(m.CONFIG_DIR)"],
                           check=True, capture_output=True, text=True, cwd=installed).stdout.split()
    assert all(str(installed) in w for w in where), where  # the installed copy, not the repo
    assert (Path(where[1]) / "kd.yaml").is_file()
    out = subprocess.run([str(installed / "bin" / "raykd"), "methods"], check=True, capture_output=True, text=True,
                         cwd=installed).stdout
    assert "kd" in out and "annealing_kd" in out and "glmd_vocab" in out


def test_a_method_runs_from_its_shipped_config(installed, tiny_model, corpus_jsonl, tmp_path):
    """``raykd distill --method kd`` from the installed package, on the tiny teacher (its own Ray)."""
    out = tmp_path / "run"
    overrides = [f"teacher.model={tiny_model}", "teacher.num_threads=1", "teacher.num_cpus=0.5", "data.source=jsonl",
                 f"data.path={corpus_jsonl}", "data.id_column=id", "data.splits={train: 0.8, eval: 0.2}",
                 "data.seq_len=32", "data.min_tokens=8", "data.sample=1.0", f"labels.cache_dir={tmp_path / 'cache'}", "labels.k=8",
                 "labels.num_labelers=1", "student.keep_layers=[0, 3]", "train.max_steps=2", "train.batch_size=4",
                 "train.num_workers=0", "train.torch_threads=1", "ray.num_cpus=2", "eval.batch_size=8"]
    proc = subprocess.run([str(installed / "bin" / "raykd"), "distill", "--method", "kd", "--output-dir", str(out),
                           *overrides], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "kd" and report["kd"]["steps"] == 2

