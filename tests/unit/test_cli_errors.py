"""User errors end in one ``error: ...`` line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from raykd import console
from raykd.cli import cli


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_bad_override_is_a_user_error(capsys, tmp_path):
    code, out, err = _run(capsys, ["distill", "--output-dir", str(tmp_path / "run"), "train.max_steps=-1"])
    assert code == 2
    assert err.startswith("error: ") and "train.max_steps" in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_a_missing_config_file_is_a_user_error(capsys, tmp_path):
    code, out, err = _run(capsys, ["label", "--config", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert err == f"error: config file {tmp_path / 'nope.yaml'} does not exist\n"
    assert "Traceback" not in out


def test_a_malformed_override_fails_for_every_subcommand(capsys, tmp_path):
    for argv in (["distill", "--output-dir", str(tmp_path), "max_steps"], ["label", "max_steps"],
                 ["tune", "minidisc", "--output-dir", str(tmp_path), "max_steps"]):
        code, out, err = _run(capsys, argv)
        assert code == 2 and err.startswith("error: override 'max_steps' is not of the form key=value"), argv
        assert "Traceback" not in out + err


def test_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = _run(capsys, ["distill", "--output-dir", str(tmp_path), "--verbose", "train.max_steps=-1"])
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-2].startswith("error: ")


def test_plan_errors_are_user_errors_but_other_value_errors_are_not(capsys):
    def plan_error():
        with console.user_errors(ValueError, FileNotFoundError):
            raise FileNotFoundError("model folder x does not exist: pip install --no-deps x")

    def bug():
        raise ValueError("a bug deep in training")

    assert console.run(plan_error) == 2
    assert capsys.readouterr().err == "error: model folder x does not exist: pip install --no-deps x\n"
    assert console.run(bug) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ValueError: a bug deep in training") and "Traceback" not in err


@pytest.mark.parametrize("argv", [["methods", "--verbose"], ["--verbose", "methods"]])
def test_verbose_is_accepted_before_and_after_the_subcommand(capsys, argv):
    code, out, _ = _run(capsys, argv)
    assert code == 0 and "paper:" in out


def test_an_unknown_method_lists_the_valid_ones(capsys, tmp_path):
    code, _, err = _run(capsys, ["distill", "--method", "nope", "--output-dir", str(tmp_path)])
    assert code == 2 and err.startswith("error: unknown method 'nope'; valid methods: ") and "annealing_kd" in err


@pytest.mark.parametrize("setting", ["labels.cache_dir=hdfs://namenode/cache", "data.path=hdfs://namenode/corpus.jsonl"])
def test_a_uri_whose_filesystem_is_missing_is_a_user_error(capsys, tmp_path, corpus_jsonl, setting):
    code, out, err = _run(capsys, ["label", "data.source=jsonl", f"data.path={corpus_jsonl}", "data.id_column=id",
                                   f"labels.cache_dir={tmp_path / 'cache'}", setting])
    assert code == 2 and err.startswith("error: ") and "hdfs" in err, err
    assert "Traceback" not in out + err and not (tmp_path / "cache").exists()


def test_split_fractions_that_do_not_sum_to_one_are_a_user_error(capsys):
    code, _, err = _run(capsys, ["label", "data.splits={train: 0.7, eval: 0.2}"])
    assert code == 2 and "sum to 0.9" in err


@pytest.mark.parametrize("method, setting, valid", [
    ("gkd", "train.loss_params.generalized_jsd.beta=1.5", "a number in [0, 1]"),
    ("distillm", "train.loss_params.skew_kl.alpha=1", "a number in [0, 1)"),
    ("minilmv2_kd", "train.loss_params.minilmv2.relation_heads=0", "a whole number >= 1"),
])
def test_a_loss_hyper_parameter_out_of_range_fails_at_load_before_ray(capsys, tmp_path, monkeypatch, method, setting, valid):
    import ray

    started: list = []  # ray.init is never reached (checked this way: the suite's shared Ray may already run)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(a) or pytest.fail("Ray was started"))
    code, out, err = _run(capsys, ["distill", "--method", method, "--output-dir", str(tmp_path / "run"), setting])
    key = setting.split("=")[0]
    assert code == 2 and err.startswith("error: ") and f"{key}=" in err and f"it must be {valid}" in err, err
    assert "Traceback" not in out + err and not (tmp_path / "run").exists()
    assert started == []


@pytest.mark.parametrize("setting", ["teacher.model", "student.model"])
def test_a_missing_local_model_path_is_not_found_and_never_reaches_the_hub(capsys, tmp_path, monkeypatch, setting):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    extra = ["student.init=pretrained"] if setting == "student.model" else []
    for missing in (str(tmp_path / "no" / "model"), "models/teacher", "./teacher", "~/no-such-raykd-model"):
        code, out, err = _run(capsys, ["label", f"{setting}={missing}", *extra])
        where = Path(missing).expanduser()
        assert code == 2 and err.startswith(f"error: not found: {where} ({setting}: "), err
        assert "hub (" not in err and "Traceback" not in out + err


def test_names_that_look_like_paths_are_paths_and_hub_ids_are_not(tmp_path, monkeypatch):
    from raykd.models import looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B"):
        assert not looks_like_path(hub_id), hub_id
    for path in ("/abs/model", "./m", "../m", "~/m", "a/b/c", "model.safetensors", "runs/student", "C:\\models\\m"):
        assert looks_like_path(path), path


@pytest.mark.parametrize("setting", ["labels.cache_dir=gs://no-such-raykd-bucket/cache",
                                     "data.path=gs://no-such-raykd-bucket/corpus/*.jsonl"])
def test_gs_without_credentials_fails_within_the_deadline(capsys, monkeypatch, tmp_path, corpus_jsonl, setting):
    import time

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("RAYKD_STORAGE_TIMEOUT_S", "2")
    start = time.monotonic()
    code, out, err = _run(capsys, ["label", "data.source=jsonl", f"data.path={corpus_jsonl}", "data.id_column=id",
                                   f"labels.cache_dir={tmp_path / 'cache'}", setting])
    assert code == 2 and time.monotonic() - start < 20, err  # the 2 s probe, not the 30 s default (loose: a loaded CI worker)
    assert err.startswith(f"error: {setting.split('=')[0]}='gs://no-such-raykd-bucket/") and "GOOGLE_APPLICATION_CREDENTIALS" in err
    assert "Traceback" not in out + err and not (tmp_path / "cache").exists()


def test_s3_with_bad_keys_or_an_unreachable_endpoint_fails_before_any_work(capsys, monkeypatch, tmp_path, s3_server):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("RAYKD_STORAGE_TIMEOUT_S", "3")
    code, out, err = _run(capsys, ["label", f"labels.cache_dir={s3_server.uri('cache')}"])
    assert code == 2 and err.startswith("error: labels.cache_dir='s3://") and "denied" in err and "AWS_SECRET_ACCESS_KEY" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    code, out2, err = _run(capsys, ["label", f"labels.cache_dir={s3_server.uri('cache')}"])
    assert code == 2 and err.startswith("error: labels.cache_dir='s3://") and "AWS_ENDPOINT_URL" in err, err
    monkeypatch.setenv("RAYKD_STORAGE_TIMEOUT_S", "soon")
    code, out3, err = _run(capsys, ["label", f"labels.cache_dir={s3_server.uri('cache')}"])
    assert code == 2 and err == "error: RAYKD_STORAGE_TIMEOUT_S='soon' must be a number of seconds above 0\n"
    assert "Traceback" not in out + out2 + out3 + err


def test_a_storage_probe_that_does_not_answer_is_bounded():
    import threading
    import time

    from raykd.storage import probe

    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer within 0.2 s"):
        probe._within(0.2, release.wait)
    assert time.monotonic() - start < 5  # returned without the release (loose: a loaded CI worker)
    release.set()
    assert probe._within(1, lambda: 7) == 7
    with pytest.raises(KeyError):
        probe._within(1, lambda: {}["x"])
