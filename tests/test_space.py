from pathlib import Path

import optuna
import pytest

from defect_tune.core.config import TrainConfig, load_config, recipe
from defect_tune.search.space import RECIPE_POINTS, DefineByRun, SpaceError, load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("name", ["quick", "defects", "el_solar", "steel", "full"])
def test_shipped_spaces_load_and_their_starting_points_are_valid_configs(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.objective == "val_guarded_macro_recall" and space.mode == "max"
    for point_name, params in space.points:
        config = space.config_for(params)
        assert config.epochs == params.get("epochs", space.max_epochs)
        assert all(getattr(config, key) == value for key, value in params.items()), point_name
    # A space with pretrained backbones measures the transfer recipe first, one without the plain
    # recipe; `defects` (sized for a short budget) leaves the plain recipe from scratch out.
    # Each as `train --recipe` trains it, but for `fixed` and the epoch budget.
    named = dict(space.points)
    assert list(named)[0] == ("transfer" if "transfer" in named else "baseline")
    assert ("baseline" in named) == (name != "defects")
    for point, recipe_name in RECIPE_POINTS.items():
        if point in named:
            expected = load_config(None, base=recipe(recipe_name))
            config = space.config_for(named[point])
            differs = {key for key in TrainConfig.model_fields if getattr(config, key) != getattr(expected, key)}
            assert differs <= set(space.fixed) | {"epochs"}, (point, differs)


def test_a_baseline_point_is_the_recipe_and_must_be_reachable(tmp_path):
    body = ("num_samples: 4\nmax_epochs: 3\nparams:\n  model: {choice: [el_cnn, resnet18]}\n"
            "  loss: {choice: [bce, weighted_bce, focal]}\n  focal_gamma: {uniform: [1.0, 3.0], when: {loss: focal}}\n"
            "  lr: {loguniform: [1.0e-4, 1.0e-2]}\npoints_to_evaluate:\n  - name: baseline\n")
    space = load_space(write(tmp_path, body))
    # no gamma: not focal
    assert space.points == (("baseline", {"model": "resnet18", "loss": "weighted_bce", "lr": 1e-3}),)
    with pytest.raises(SpaceError, match=r"baseline.*lr 0.001 is outside the searched loguniform \[0.01, 0.1\]"):
        load_space(write(tmp_path, body.replace("[1.0e-4, 1.0e-2]", "[1.0e-2, 1.0e-1]")))
    with pytest.raises(SpaceError, match="params.epochs"):
        load_space(write(tmp_path, body.replace("  lr:", "  epochs: {choice: [2, 5]}\n  lr:")))


def sample_many(space, n=60, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define = DefineByRun(space)
    study.optimize(lambda trial: (define(trial), 0.0)[1], n_trials=n)
    return study.trials


def test_conditionals_are_real_no_gamma_for_a_bce_trial():
    trials = sample_many(load_space(SPACES / "quick.yaml"))
    losses = {t.params["loss"] for t in trials}
    assert losses == {"bce", "weighted_bce", "focal", "asl"}
    for t in trials:
        loss = t.params["loss"]
        assert ("focal_gamma" in t.params) == (loss == "focal")
        assert ("asl_gamma_neg" in t.params) == (loss == "asl")
        assert ("class_weight_exponent" in t.params) == (loss in ("weighted_bce", "focal"))


def test_types_bounds_and_log_scales():
    space = load_space(SPACES / "full.yaml")
    trials = sample_many(space, n=80)
    for t in trials:
        assert 1e-5 <= t.params["lr"] <= 3e-3 and t.distributions["lr"].log
        assert isinstance(t.params["freeze_epochs"], int) and 0 <= t.params["freeze_epochs"] <= 3
        assert t.params["batch_size"] in (16, 32, 64)
        if t.params["mixup_alpha"] == 0.0:
            assert "mixup_labels" not in t.params
        space.config_for(t.params)  # every sampled point is a valid training config
    assert isinstance(trials[0].distributions["model"], optuna.distributions.CategoricalDistribution)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


BASE = "num_samples: 4\nmax_epochs: 3\n"


@pytest.mark.parametrize(
    "body, message",
    [
        ("params: {lerning_rate: {uniform: [0.1, 0.2]}}", "params.lerning_rate: not a config key"),
        ("params: {lr: {uniform: [0.2, 0.1]}}", "params.lr: uniform needs low < high"),
        ("params: {lr: {loguniform: [0, 0.1]}}", "params.lr: loguniform needs low > 0"),
        ("params: {lr: {uniform: [0.1, 2.0]}}", "params.lr: bound 2.0 is outside"),
        ("params: {lr: {normal: [0.1, 0.2]}}", "params.lr: needs exactly one of"),
        ("params: {freeze_epochs: {int: [0.5, 3]}}", "params.freeze_epochs: int needs integer bounds"),
        ("params: {loss: {choice: [bce, hinge]}}", "params.loss: choice 'hinge' is invalid"),
        ("params: {model: {choice: [resnet_18]}}", "params.model: model 'resnet_18'"),
        ("params: {focal_gamma: {uniform: [1, 2], when: {loss: focal}}, loss: {choice: [focal]}}",
         "params.focal_gamma.when.loss: must name a parameter listed before"),
        ("params: {loss: {choice: [bce]}, focal_gamma: {uniform: [1, 2], when: {loss: focal}}}",
         r"params.focal_gamma.when.loss: \['focal'\] not among its choices"),
        ("fixed: {lr: 0.1}\nparams: {lr: {uniform: [0.1, 0.2]}}", "params.lr: is also in fixed"),
        ("fixed: {batch: 3}\nparams: {lr: {uniform: [0.1, 0.2]}}", "fixed: "),
        ("asha: {grace_period: 9}\nparams: {lr: {uniform: [0.1, 0.2]}}", "asha.grace_period"),
        ("sampler: tpe\nparams: {lr: {uniform: [0.1, 0.2]}}", "sampler: unknown key"),
        ("cv: 1\nparams: {lr: {uniform: [0.1, 0.2]}}", "cv: must be 0 .*, an integer >= 2 .* or auto, got 1"),
        ("cv: five\nparams: {lr: {uniform: [0.1, 0.2]}}", "cv: must be 0"),
        ("params: {}", "params: needs at least one"),
        ("params: {loss: {choice: [bce, focal]}, focal_gamma: {uniform: [1, 2], when: {loss: focal}}}\n"
         "points_to_evaluate: [{name: p, params: {loss: bce, focal_gamma: 2}}]",
         r"points_to_evaluate\[0\].params.focal_gamma: not sampled on this branch"),
        ("params: {loss: {choice: [bce, focal]}, focal_gamma: {uniform: [1, 2], when: {loss: focal}}}\n"
         "points_to_evaluate: [{name: p, params: {loss: focal}}]",
         r"points_to_evaluate\[0\].params.focal_gamma: missing"),
        ("params: {lr: {uniform: [0.1, 0.2]}}\npoints_to_evaluate: [{params: {lr: 0.5}}]",
         r"points_to_evaluate\[0\].params.lr: 0.5 is outside"),
    ],
)
def test_malformed_spaces_name_the_key(tmp_path, body, message):
    with pytest.raises(SpaceError, match=message):
        load_space(write(tmp_path, BASE + body))


def test_missing_budget_and_bad_yaml(tmp_path):
    with pytest.raises(SpaceError, match="num_samples: must be a positive integer"):
        load_space(write(tmp_path, "max_epochs: 3\nparams: {lr: {uniform: [0.1, 0.2]}}"))
    with pytest.raises(SpaceError, match="space.yaml"):
        load_space(write(tmp_path, "params: [unclosed"))


def test_config_for_merges_fixed_sampled_and_the_epoch_budget(tmp_path):
    space = load_space(write(tmp_path, BASE + "fixed: {batch_size: 16}\nparams: {lr: {uniform: [0.1, 0.2]}}"))
    config = space.config_for({"lr": 0.15})
    assert (config.batch_size, config.lr, config.epochs) == (16, 0.15, 3)


def test_command_line_overrides_set_fixed_values_and_the_epoch_budget_never_a_searched_key():
    space = load_space(SPACES / "quick.yaml")
    changed = space.with_overrides({"epochs": 2, "batch_size": 16, "augment": "none"})
    assert changed.max_epochs == 2 and changed.fixed["batch_size"] == 16
    config = changed.config_for({"lr": 1e-3})
    assert (config.epochs, config.batch_size, config.augment, config.lr) == (2, 16, "none", 1e-3)
    assert space.fixed.get("batch_size") != 16 and space.with_overrides({}) is space  # the loaded space is untouched
    with pytest.raises(SpaceError, match="override lr=0.1: .*quick.yaml searches lr"):
        space.with_overrides({"lr": 0.1})
    with pytest.raises(SpaceError, match="override epochs=0: the epoch budget must be a positive integer"):
        space.with_overrides({"epochs": 0})
    with pytest.raises(SpaceError, match="nonsense: unknown key"):
        space.with_overrides({"nonsense": 1})
    graced = load_space(SPACES / "quick.yaml").with_overrides({"epochs": 1})
    assert graced.max_epochs == 1  # quick's grace period is 1


def test_a_resumed_sweep_keeps_its_overrides_and_refuses_others(tmp_path):
    from defect_tune.search.options import SearchError, SearchOptions
    from defect_tune.search.records import OVERRIDES_RECORD, overrides_for_sweep, record_overrides

    new = SearchOptions(data=tmp_path, space=SPACES / "quick.yaml", name="s", overrides={"epochs": 2})
    assert overrides_for_sweep(new, tmp_path) == {"epochs": 2}
    assert not (tmp_path / OVERRIDES_RECORD).exists()  # written only once the sweep is known to be new
    record_overrides(new, tmp_path)
    resumed = SearchOptions(data=tmp_path, space=SPACES / "quick.yaml", name="s", resume=True)
    assert overrides_for_sweep(resumed, tmp_path) == {"epochs": 2}
    record_overrides(resumed, tmp_path)  # a resumed sweep never rewrites the record
    other = SearchOptions(data=tmp_path, space=SPACES / "quick.yaml", name="s", resume=True, overrides={"epochs": 3})
    with pytest.raises(SearchError, match=r"started with overrides \{'epochs': 2\}.*drop the key=value arguments"):
        overrides_for_sweep(other, tmp_path)
    assert overrides_for_sweep(resumed, tmp_path / "never-overridden") == {}


def test_trade_offs_make_the_searcher_multi_objective_on_costs_only(tmp_path):
    path = tmp_path / "space.yaml"
    base = (SPACES / "quick.yaml").read_text()
    path.write_text(base + "trade_offs: [cost/latency_ms_b1, cost/params]\n")
    space = load_space(path)
    assert space.trade_offs == (("cost/latency_ms_b1", "min"), ("cost/params", "min"))
    assert space.metrics == (["val_selection_score", "cost/latency_ms_b1", "cost/params"], ["max", "min", "min"])
    assert load_space(SPACES / "quick.yaml").trade_offs == ()
    for bad in ("trade_offs: [val_loss]", "trade_offs: cost/params", "trade_offs: [cost/params, cost/params]"):
        path.write_text(base + bad + "\n")
        with pytest.raises(SpaceError, match="trade_offs"):
            load_space(path)
    from defect_tune.search.trial import diverged_report

    worst = diverged_report("val_guarded_macro_recall", "max", space.trade_offs)
    assert worst["cost/latency_ms_b1"] == worst["cost/params"] == float("inf") and worst["val_selection_score"] == 0.0
