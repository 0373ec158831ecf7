"""The method registry, every shipped method config, and the schedules (no Ray)."""

from __future__ import annotations

import pytest

from raykd.cli import main_methods
from raykd.config import ConfigError, DistillConfig
from raykd.methods import (
    CONFIG_DIR,
    Method,
    available_methods,
    get_method,
    load,
    register_method,
)
from raykd.train.loop import LoopConfig
from raykd.train.schedule import schedule_at

METHODS = list(available_methods())


def test_every_method_has_a_config_that_names_it_and_every_config_a_method():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base") == sorted(METHODS)  # base.yaml: what they share
    for name in METHODS:
        cfg = load(DistillConfig, get_method(name).config_path)
        assert cfg.method == name and cfg.run_name == name


def test_every_method_is_listed_as_run_by_a_test_or_as_taking_the_path_of_one_that_is():
    """Bookkeeping over the tests' lists (it checks names, not runs): every method is named in the
    list of a test that gives it a short run of its own (the Ray tests, or the runs without Ray of
    the feature and on-policy methods' shipped objectives), or in a ``SAME_PATH_AS`` table that
    points it at such a method (TAKD at DGKD's chain)."""
    from tests.ray import test_chains, test_cross_tokenizer, test_feature_methods, test_methods
    from tests.ray import test_on_policy as ray_on_policy
    from tests.unit import test_method_runs
    from tests.unit import test_on_policy as unit_on_policy

    run = {*test_methods.SINGLE_TEACHER, *test_methods.MULTI_TEACHER, *test_methods.RUN_ELSEWHERE, *test_chains.CHAINS,
           *ray_on_policy.ON_POLICY, "seqkd", *test_cross_tokenizer.CROSS_TOKENIZER, *test_feature_methods.FEATURE_METHODS,
           *test_method_runs.FEATURE_METHODS, *unit_on_policy.ON_POLICY_METHODS}
    same_path = dict(test_chains.SAME_PATH_AS)
    assert run | set(same_path) == set(METHODS), f"methods without a tiny-model run: {sorted(set(METHODS) - run - set(same_path))}"
    assert set(same_path.values()) <= run  # the path they take is run


def test_raykd_methods_lists_every_method_loss_and_student_architecture(capsys):
    from raykd.losses import available_losses
    from raykd.students import STUDENT_ARCHITECTURES

    rows = dict(main_methods(verbose=True))
    out = capsys.readouterr().out
    for name in [*METHODS, *available_losses(), *STUDENT_ARCHITECTURES]:
        assert name in rows and f"  {name} " in out
    assert "paper: Jafari et al. 2021" in out
    assert {"albert", "mobilebert", "theseus"} <= set(STUDENT_ARCHITECTURES)
    for name in ("albert", "mobilebert", "theseus"):  # each with its paper
        assert any(year in rows[name] for year in ("2020", "2021")), rows[name]


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(KeyError, match="valid methods: .*annealing_kd.*kd"):
        get_method("kdd")
    with pytest.raises(ConfigError, match="unknown method 'kdd'; valid methods"):
        load(DistillConfig, None, ["method=kdd"])


def test_register_method_refuses_unknown_features_and_duplicates():
    with pytest.raises(ValueError, match="unknown features"):
        register_method(Method(name="x_kd", description="", paper="", composes="", uses=frozenset({"chains"})))
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("kd"))


@pytest.mark.parametrize("overrides, message", [
    (["method=glmd", "train.students={s: {forward_kl: 0.5, ce: 0.5}}"], "no hard labels"),
    (["method=kd", "train.phases=[{until: 1.0, temperature: 2.0}]"], "does not use \\['phases'\\]"),
    (["method=pd"], "needs \\['phases'\\]"),
    (["method=pd", "train.phases=[{until: 0.5, weights: {forward_kl: 1}}, {until: 1.0}]"], "pre-trains first"),
    (["method=tmkd"], "needs \\['teachers'\\]"),
    (["train.students={s: {forward_kl: 0.0, ce: 0.0}}"], "all weights are zero"),
    (["train.students={s: {forward_kl: -1.0}}"], "must be finite and >= 0"),
    (["train.students={s: {fwd_kl: 1.0}}"], "unknown loss 'fwd_kl'; valid losses: (.*, )?ce, (.*, )?forward_kl"),
    (["train.phases=[{until: 0.5}]", "method=pd"], "the last at 1.0"),
    (["train.loss_params={generalized_jsd: {beta: 0.5}}"], "not a term"),
    (["train.students={s: {skew_kl: 1}}", "train.loss_params={skew_kl: {beta: 0.5}}"], "accepts \\['alpha'\\]"),
    (["method=tmkd", "extra_teachers=[{name: teacher}]"], "teacher names must differ"),
    (["method=kd", "train.students={s: {forward_kl: 0.5, pkd: 1.0}}"], "does not use \\['features'\\]"),
    (["method=patient_kd", "train.students={s: {forward_kl: 0.5, ce: 0.5}}", "train.loss_params={}"],
     "needs \\['features'\\]"),
    (["method=patient_kd", "train.students={s: {ce: 0.5, pkd: 1.0}}"], "trains every student on \\['pkd', 'forward_kl'\\]"),
    (["train.layer_map=[[0, 0]]"], "no objective has a feature term"),
    (["method=tinybert_kd", "train.students={s: {forward_kl: 1, tinybert: 1}}", "student.init=pretrained",
      "student.model=other"], "need train.layer_map"),
    (["method=tinybert_kd", "train.students={s: {forward_kl: 1, tinybert: 1}}", "train.strategy=fsdp"],
     "use train.strategy=ddp"),
    (["method=mixbaseline", "train.students={s: {forward_kl: 1, diito: 1, pkd: 1}}", "train.feature_teacher=cached"],
     "diito runs a second, intervened teacher forward.*train.feature_teacher=online"),
    (["method=mixbaseline", "train.students={s: {forward_kl: 1, diito: 1, pkd: 1}}",
      "train.loss_params={diito: {interchange_prop: 2.0}}"], "interchange_prop=2.0 .* in \\(0, 1\\]"),
])
def test_bad_method_configs_are_refused_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(DistillConfig, None, overrides)


def test_schedule_phases_and_linear_interpolation():
    phases = [{"until": 0.5, "weights": {"ce": 1.0}, "weights_end": None, "temperature": 4.0, "temperature_end": 2.0},
              {"until": 1.0, "weights": None, "weights_end": None, "temperature": None, "temperature_end": None}]
    own = {"forward_kl": 0.5, "ce": 0.5}
    assert schedule_at(phases, 0, 10, own, 1.0, ["forward_kl"]) == ({"ce": 1.0, "forward_kl": 0.0}, 4.0)
    assert schedule_at(phases, 4, 10, own, 1.0) == ({"ce": 1.0}, pytest.approx(2.4))
    assert schedule_at(phases, 5, 10, own, 1.0) == (own, 1.0)  # phase 2: the student's own objective
    assert schedule_at([], 3, 10, own, 1.0) == (own, 1.0)


@pytest.mark.parametrize("method", ["pd", "annealing_kd", "continuation_kd"])
def test_shipped_schedules_start_and_end_where_the_method_says(method):
    cfg = load(DistillConfig, get_method(method).config_path, ["train.max_steps=20"])
    (weights,) = cfg.train.students.values()
    loop_cfg = LoopConfig(run_label="s", student_path="-", weights=weights, temperature=cfg.labels.temperature,
                          terms=cfg.train.objective_terms(), train=cfg.train)
    first, t_first = loop_cfg.objective_at(0)
    last, t_last = loop_cfg.objective_at(19)
    if method == "pd":  # pre-training without the teacher, then the KD objective
        assert first.weights == {"ce": 1.0, "forward_kl": 0.0} and last.weights == weights
        assert not first.needs_teacher or first.weights["forward_kl"] == 0.0
    elif method == "annealing_kd":  # hot teacher first, hard labels last
        assert first.weights["forward_kl"] == 1.0 and t_first == 4.0
        assert last.weights == {"ce": 1.0, "forward_kl": 0.0} and t_last == 1.0
    else:  # smoothed objective first, the full one at the end
        assert first.weights == {"ce": 0.0, "forward_kl": 1.0} and t_first == 4.0
        assert last.weights["ce"] == pytest.approx(0.5 * 19 / 20) and t_last == pytest.approx(1.0 + 3.0 / 20)


def test_the_registry_checks_run_on_every_load_path_and_before_a_run(tmp_path):
    from raykd.methods import run_method
    from raykd.recipes.lm.kd_search import KDSearchConfig

    with pytest.raises(ConfigError, match=r"\n  distill: Value error, train.students.s: unknown loss 'fwd_kl'"):
        load(KDSearchConfig, "tune/configs/kd_smollm2.yaml", ["distill.train.students={s: {fwd_kl: 1.0}}"])
    built = DistillConfig.model_validate({"method": "pd"})  # built in code: only the registries refuse it
    with pytest.raises(ValueError, match=r"method 'pd' needs \['phases'\]"):
        run_method(built, tmp_path)
