"""User errors end in one ``error: ...`` line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

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
