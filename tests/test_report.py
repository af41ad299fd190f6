"""The sweep report, from a results folder laid out as `search` writes it (no Ray)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from defect_tune.cli import app
from defect_tune.core.config import PREDICTIONS_FILE
from defect_tune.core.metrics import learn_thresholds
from defect_tune.report.load import ReportError, load_sweep, trial_indices
from defect_tune.report.page import write_report
from defect_tune.report.study import importances, rebuild_study, savings, tied_with_leader

CLASSES = ["crack", "dark_area", "finger_interruption", "scratch"]
MAX_EPOCHS = 4
SPACE = """\
objective: val_guarded_macro_recall
mode: max
num_samples: 8
max_epochs: 4
asha: {grace_period: 1, reduction_factor: 2}
fixed: {batch_size: 16}
params:
  model: {choice: [el_cnn, steel_cnn]}
  loss: {choice: [bce, weighted_bce, focal, asl]}
  class_weight_exponent: {uniform: [0.0, 1.0], when: {loss: [weighted_bce, focal]}}
  focal_gamma: {uniform: [0.5, 4.0], when: {loss: focal}}
  asl_gamma_neg: {uniform: [1.0, 6.0], when: {loss: asl}}
  lr: {loguniform: [3.0e-4, 3.0e-3]}
points_to_evaluate:
  - name: el_seed
    params: {model: el_cnn, loss: weighted_bce, class_weight_exponent: 0.5, lr: 1.0e-3}
"""
# In the order Tune started them; conditional parameters only where their branch samples them.
TRIALS = [
    dict(index=0, starting_point="el_seed", stop="completed", epochs=4, objective=0.62,
         params=dict(model="el_cnn", loss="weighted_bce", class_weight_exponent=0.5, lr=1e-3)),
    dict(index=1, stop="asha", epochs=1, objective=0.31,
         params=dict(model="steel_cnn", loss="focal", class_weight_exponent=0.3, focal_gamma=2.0, lr=2e-3)),
    dict(index=2, stop="completed", epochs=4, objective=0.71, params=dict(model="el_cnn", loss="bce", lr=5e-4)),
    dict(index=3, stop="error", epochs=2, objective=None,
         params=dict(model="steel_cnn", loss="asl", asl_gamma_neg=3.0, lr=8e-4),
         error="RuntimeError: CUDA out of memory"),
    dict(index=4, stop="early_stopping", epochs=3, objective=0.55,
         params=dict(model="el_cnn", loss="focal", class_weight_exponent=0.8, focal_gamma=1.0, lr=1.5e-3)),
    dict(index=5, stop="asha", epochs=2, objective=0.40, params=dict(model="steel_cnn", loss="bce", lr=2.5e-3)),
]
PARAMS = ["model", "loss", "class_weight_exponent", "focal_gamma", "asl_gamma_neg", "lr"]
SECTIONS = ["Leaderboard", "Optimization history", "Parameter importances", "Parameters vs objective",
            "Per-class recall of the top configurations", "ASHA&#x27;s savings",
            "Precision-recall curves of the best trial"]


# Tune's trial ids are random; the order trials started is only in their folders' names.
IDS = ["d41c8a0e", "7555c64f", "f0b2e913", "0a93c2d1", "bc683f5d", "3e8f1a27"]


def trial_id(trial: dict) -> str:
    return IDS[trial["index"]]


def predictions(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Validation predictions that rank positives higher; no 'scratch' positives at all."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(CLASSES))) < [0.3, 0.15, 0.05, 0.0]).astype(np.int64)
    probs = np.clip(0.45 * targets + rng.uniform(0, 0.6, targets.shape), 0, 1)
    return probs, targets


def make_results(root: Path, trials=TRIALS, space: str | None = SPACE, params=PARAMS) -> Path:
    results = root / "results" / "sweep"
    results.mkdir(parents=True)
    space_path = root / "space.yaml"
    if space:
        space_path.write_text(space)
    rows = []
    for trial in trials:
        # As Tune names a trial's folder: trainable, id, 1-based index, parameters, start time.
        (root / "tune" / "sweep" / (f"run_trial_{trial_id(trial)}_{trial['index'] + 1}"
                                    f"_lr={trial['params']['lr']:.4f}_2026-11-26_13-22-58")).mkdir(parents=True)
        row = {"trial_id": trial_id(trial), "starting_point": trial.get("starting_point")}
        row.update({f"param/{p}": trial["params"].get(p, np.nan) for p in params})
        row.update(status="error" if trial["stop"] == "error" else "terminated", stop_reason=trial["stop"],
                   epochs=trial["epochs"], error=trial.get("error"))
        row["val_guarded_macro_recall"] = np.nan if trial["objective"] is None else trial["objective"]
        if trial["objective"] is not None:
            checkpoint = root / "tune" / "train" / f"sweep-{trial_id(trial)}" / "checkpoint_000001"
            checkpoint.mkdir(parents=True)
            probs, targets = predictions(trial["index"])
            np.savez_compressed(checkpoint / PREDICTIONS_FILE, probs=probs, targets=targets, classes=np.array(CLASSES))
            row.update(best_epoch=trial["epochs"], val_macro_precision=0.5, val_macro_f2=0.5, val_macro_ap=0.6,
                       val_loss=0.3, checkpoint=str(checkpoint), nodes="node1", wall_seconds=12.5)
            row["val_macro_recall@0.5"] = 0.4
            # A bootstrap interval of +-0.1: the leader's (0.71) holds el_seed's 0.62, not 0.55.
            row["val_guarded_macro_recall_low"] = trial["objective"] - 0.1
            row["val_guarded_macro_recall_high"] = trial["objective"] + 0.1
            row.update({f"val_recall/{c}": (np.nan if c == "scratch" else trial["objective"] - 0.1 * k)
                        for k, c in enumerate(CLASSES)})
            thresholds = learn_thresholds(probs, targets, "recall_at_precision", 0.5)  # as the trial exported them
            row.update({f"threshold/{c}": float(t) for c, t in zip(CLASSES, thresholds)})
        rows.append(row)
    board = pd.DataFrame(rows)  # no trials: no columns either, as `build_leaderboard` writes it
    if rows:
        board = board.sort_values("val_guarded_macro_recall", ascending=False, na_position="last", kind="stable")
        board.insert(0, "rank", range(1, len(board) + 1))
    board.to_parquet(results / "leaderboard.parquet", index=False)
    finished = [t for t in trials if t["objective"] is not None]
    best = max(finished, key=lambda t: t["objective"]) if finished else None
    summary = {
        "name": "sweep", "space": str(space_path), "data": str(root / "data"), "source_fingerprint": "sha256:0123abcd",
        "experiment": str(root / "tune" / "sweep"), "objective": "val_guarded_macro_recall", "mode": "max",
        "num_samples": 8, "max_epochs": MAX_EPOCHS, "classes": CLASSES, "trials": len(trials), "seconds": 754.2,
        "stop_reasons": board["stop_reason"].value_counts().to_dict() if rows else {},
    }
    if best:
        summary["best"] = {"trial_id": trial_id(best), "val_guarded_macro_recall": best["objective"],
                           "params": best["params"]}
        (results / "best_config.yaml").write_text(f"# best of sweep\nlr: {best['params']['lr']}\n"
                                                  "precision_floor: 0.5\n")
    (results / "sweep.json").write_text(json.dumps(summary))
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    results = make_results(tmp_path_factory.mktemp("report"))
    path = write_report(results)
    return path, path.read_text()


def best_checkpoint(results: Path) -> str:
    return pd.read_parquet(results / "leaderboard.parquet")["checkpoint"].iloc[0]


def test_the_page_is_self_contained_and_has_every_section(report):
    path, page = report
    assert path == path.parent.parent / "report" / "report.html" and path.parent.parent.name == "sweep"
    sources = re.findall(r"src=['\"]([^'\"]*)", page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:  # every embedded figure is a real PNG
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    assert "http" not in page and "<link" not in page and "<script" not in page
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert "sha256:0123abcd" in page and "guarded" in page and "12m34s" in page


def test_the_leaderboard_lists_every_trial_best_first(report):
    _, page = report
    table = page.split("<h2>Leaderboard</h2>", 1)[1].split("</table>", 1)[0]
    ids = re.findall("|".join(IDS), table)
    expected = [trial_id(t) for t in sorted(TRIALS, key=lambda t: -1 if t["objective"] is None else t["objective"],
                                            reverse=True)]
    assert ids == expected
    assert "el_seed" in table and "0.7100" in table and "stopped by ASHA" in table
    best_row = re.search(r"<tr class='best'>(.*?)</tr>", table).group(1)
    assert trial_id(TRIALS[2]) in best_row and "0.0005" in best_row


def test_trials_inside_the_leaders_interval_are_marked_tied(report):
    _, page = report
    section = page.split("<h2>Leaderboard</h2>", 1)[1].split("<h2>", 1)[0]
    rows = {trial: row for row in re.findall(r"<tr[^>]*>(.*?)</tr>", section) for trial in IDS if trial in row}
    assert "0.610–0.810" in rows[trial_id(TRIALS[2])]  # the leader's own interval
    assert [trial for trial, row in rows.items() if ">tied<" in row] == [trial_id(TRIALS[0])]  # 0.62, inside 0.61-0.81
    assert "1 trial(s) marked tied" in section


def test_without_intervals_nothing_is_tied():
    board = pd.DataFrame({"val_guarded_macro_recall": [0.7, 0.69]})  # a leaderboard from before intervals
    assert not tied_with_leader(board, "val_guarded_macro_recall").any()
    board = pd.DataFrame({"val_guarded_macro_recall": [0.7, 0.69, 0.5, np.nan],
                          "val_guarded_macro_recall_low": [0.6, 0.6, 0.4, np.nan],
                          "val_guarded_macro_recall_high": [0.8, 0.8, 0.6, np.nan]})
    assert tied_with_leader(board, "val_guarded_macro_recall").tolist() == [False, True, False, False]


def test_pngs_are_written_next_to_the_page_at_a_readable_size(report):
    path, _ = report
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert pngs == ["asha_savings.png", "history.png", "importances.png", "parallel_coordinates.png",
                    "precision_recall.png", "recall_per_class.png"]
    for name in pngs:
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG"
            assert 500 <= image.width <= 2500 and 250 <= image.height <= 2000, (name, image.size)


def test_asha_savings_count_epochs_run_against_the_full_budget(report, tmp_path):
    _, page = report
    run = sum(t["epochs"] for t in TRIALS)
    full = len(TRIALS) * MAX_EPOCHS
    asha = [t for t in TRIALS if t["stop"] == "asha"]
    asha_saved = sum(MAX_EPOCHS - t["epochs"] for t in asha)
    numbers = savings(load_sweep(make_results(tmp_path)))
    assert (numbers["run"], numbers["full"], numbers["saved"]) == (run, full, full - run)
    assert numbers["by_reason"]["asha"] == {"trials": len(asha), "run": sum(t["epochs"] for t in asha),
                                            "saved": asha_saved}
    assert f"ran <b>{run}</b> of the <b>{full}</b> epochs" in page
    assert f"{(full - run) / full:.1%} saved" in page
    assert f"ASHA stopped {len(asha)} trials early, saving {asha_saved} epochs ({asha_saved / full:.1%}" in page


def test_the_study_is_rebuilt_as_the_searcher_saw_it(tmp_path):
    study, notes = rebuild_study(load_sweep(make_results(tmp_path)))
    assert notes == []
    states = [t.state.name for t in study.trials]
    expected = {"completed": "COMPLETE", "early_stopping": "COMPLETE", "asha": "PRUNED", "error": "FAIL"}
    assert states == [expected[t["stop"]] for t in TRIALS]  # in trial-index order
    for trial, frozen in zip(TRIALS, study.trials):
        assert frozen.user_attrs["trial_id"] == trial_id(trial)
        assert frozen.params == trial["params"]  # no unsampled conditionals as NaN
    assert study.trials[1].intermediate_values == {1: 0.31}
    assert study.trials[0].distributions["lr"] == optuna.distributions.FloatDistribution(3e-4, 3e-3, log=True)
    values, reason = importances(study)
    assert reason is None and values
    assert set(values) <= {"model", "loss", "class_weight_exponent", "focal_gamma", "lr"}
    assert sum(values.values()) == pytest.approx(1.0)


def test_a_sweep_bounded_by_its_time_budget_says_so_and_counts_cut_off_trials_as_pruned(tmp_path):
    cut = dict(index=3, stop="time_budget", epochs=2, objective=0.45, params=dict(model="el_cnn", loss="bce", lr=1e-3))
    results = make_results(tmp_path, trials=[*TRIALS[:3], cut])
    summary = json.loads((results / "sweep.json").read_text())
    summary.update(num_samples=None, time_budget={"seconds": 1200, "cut_off": [trial_id(cut)]})  # no --num-samples
    (results / "sweep.json").write_text(json.dumps(summary))
    study, _ = rebuild_study(load_sweep(results))
    assert study.trials[-1].state.name == "PRUNED" and study.trials[-1].intermediate_values == {2: 0.45}
    page = write_report(results).read_text()
    assert "<dd class=text>4 within a time budget of 20m, up to 4 epochs each</dd>" in page
    assert "cut off by the time budget 1" in page


def test_a_conditional_choice_of_none_is_told_apart_from_not_sampled(tmp_path):
    # focal_alpha: null is a real choice of focal trials; the leaderboard stores it as None, as it
    # does for trials whose branch never sampled focal_alpha. The space tells them apart.
    space = SPACE.replace("  lr: {", "  focal_alpha: {choice: [null, dynamic], when: {loss: focal}}\n  lr: {")
    trials = [{**t, "params": {**t["params"], **({"focal_alpha": None} if t["params"]["loss"] == "focal" else {})}}
              for t in TRIALS]
    study, notes = rebuild_study(load_sweep(make_results(tmp_path, trials, space, PARAMS + ["focal_alpha"])))
    assert notes == []
    for trial, frozen in zip(trials, study.trials):
        assert frozen.params == trial["params"]
    assert study.trials[1].params["focal_alpha"] is None and "focal_alpha" not in study.trials[0].params


def test_trials_are_put_in_the_order_they_started(tmp_path):
    results = make_results(tmp_path)
    sweep = load_sweep(results)
    assert sweep.order_note is None
    assert sweep.in_start_order()["trial_id"].tolist() == IDS  # from the experiment's folder names
    # Older Tune ids carry the index themselves.
    assert trial_indices(pd.DataFrame({"trial_id": ["ab12_00002", "ab12_00000", "ab12_00001"]}), None) == (
        [2, 0, 1], None)
    # Without the experiment folder the order is a guess, and the report says so.
    shutil.rmtree(tmp_path / "tune" / "sweep")
    sweep = load_sweep(results)
    assert sweep.in_start_order()["trial_id"].tolist() == sorted(IDS)
    page = write_report(results).read_text()
    assert "trials are shown in trial-id order" in page and html.escape(str(tmp_path / "tune" / "sweep")) in page


def test_a_single_finished_trial_says_why_there_are_no_importances(tmp_path):
    results = make_results(tmp_path, trials=[TRIALS[1], TRIALS[2], TRIALS[3]])
    page = write_report(results).read_text()
    section = page.split("<h2>Parameter importances</h2>", 1)[1].split("</section>", 1)[0]
    assert "No parameter importances" in section and "1 such trial" in section and "<img" not in section
    assert not (results / "report" / "importances.png").exists()
    assert "No parallel coordinates: 1 trial ran its full budget" in page
    assert (results / "report" / "precision_recall.png").exists()  # the rest of the report is still there


def test_missing_predictions_name_the_file(tmp_path):
    results = make_results(tmp_path)
    missing = Path(best_checkpoint(results)) / PREDICTIONS_FILE
    missing.unlink()
    page = write_report(results, tmp_path / "elsewhere").read_text()
    assert html.escape(f"{missing} not found") in page
    assert not (tmp_path / "elsewhere" / "precision_recall.png").exists()
    assert (tmp_path / "elsewhere" / "history.png").exists()


def test_a_remote_checkpoint_is_named_not_fetched(tmp_path):
    results = make_results(tmp_path)
    board = pd.read_parquet(results / "leaderboard.parquet")
    board.loc[0, "checkpoint"] = "s3://bucket/sweeps/sweep/train/sweep-f0b2e913/checkpoint_000003"
    board.to_parquet(results / "leaderboard.parquet", index=False)
    page = write_report(results).read_text()
    assert ("remote storage (s3://bucket/sweeps/sweep/train/sweep-f0b2e913/checkpoint_000003/val_predictions.npz)"
            in page)


def test_a_class_without_validation_positives_is_said_not_drawn(report):
    _, page = report
    section = page.split("<h2>Precision-recall curves of the best trial</h2>", 1)[1].split("</section>", 1)[0]
    assert "No curve for scratch: no positives among the 120 validation images." in section
    assert "<img" in section


def test_a_cross_validated_trials_curves_use_every_folds_held_out_predictions(tmp_path):
    results = make_results(tmp_path)
    board = pd.read_parquet(results / "leaderboard.parquet")
    folds = []
    for fold, n in enumerate((50, 40, 20)):
        file = tmp_path / "tune" / "train" / f"sweep-{board.loc[0, 'trial_id']}-folds" / "epoch_004" / f"fold{fold}.npz"
        file.parent.mkdir(parents=True, exist_ok=True)
        probs, targets = predictions(10 + fold, n)
        np.savez_compressed(file, probs=probs, targets=targets, classes=np.array(CLASSES))
        folds.append(str(file))
    board["fold_predictions"] = None
    board.loc[0, "fold_predictions"] = json.dumps(folds)
    board.to_parquet(results / "leaderboard.parquet", index=False)
    page = write_report(results).read_text()
    # 50 + 40 + 20, not the 120 of the checkpoint column
    assert "No curve for scratch: no positives among the 110 validation images." in page
    Path(folds[1]).unlink()  # one fold's predictions gone: said, not drawn from the others
    page = write_report(results, tmp_path / "again").read_text()
    assert html.escape(f"{folds[1]} not found") in page


def test_without_the_search_space_distributions_are_inferred(tmp_path):
    results = make_results(tmp_path, space=None)
    page = write_report(results).read_text()
    assert "inferred from the values tried" in page
    assert (results / "report" / "importances.png").exists()


def test_failed_trials_are_listed_with_their_error(report):
    _, page = report
    section = page.split("<h2>Failed trials</h2>", 1)[1].split("</section>", 1)[0]
    assert trial_id(TRIALS[3]) in section and "CUDA out of memory" in section


def defect_tune(*args):
    """The command in-process (importing torch and Ray again in a subprocess costs 10-20 s)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_the_report_and_says_where(tmp_path):
    results = make_results(tmp_path)
    result = defect_tune("report", results, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'out' / 'report.html'} (6 figures" in result.stderr.replace("\n", "")
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_without_results_exits_2_naming_the_file(tmp_path):
    result = defect_tune("report", tmp_path)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # typer.Exit(2), not a crash
    assert f"{tmp_path / 'leaderboard.parquet'}: not found" in result.stderr.replace("\n", "")


def test_a_sweep_without_trials_is_an_error_naming_the_file(tmp_path):
    results = make_results(tmp_path, trials=[])
    with pytest.raises(ReportError, match=r"leaderboard.parquet: the sweep recorded no trials"):
        write_report(results)


def test_costs_appear_in_the_leaderboard_and_the_pareto_front_marks_trials_no_other_beats_on_both(tmp_path):
    from defect_tune.report.figures import pareto_front

    results = make_results(tmp_path)
    board = pd.read_parquet(results / "leaderboard.parquet")
    latency = {0: 1.0, 1: 0.5, 2: 5.0, 3: None, 4: 2.0, 5: 0.4}  # by trial index; the failed trial has none
    by_id = {trial_id(t): t["index"] for t in TRIALS}
    board["cost/latency_ms_b1"] = [latency[by_id[t]] for t in board["trial_id"]]
    board["cost/params"] = [None if by_id[t] == 3 else 1e5 * (1 + by_id[t] % 2) for t in board["trial_id"]]
    board.to_parquet(results / "leaderboard.parquet", index=False)

    front = pareto_front(board, "val_guarded_macro_recall", "max", "cost/latency_ms_b1")
    # 0.71 at 5 ms, 0.62 at 1 ms and 0.40 at 0.4 ms; 0.55 at 2 ms loses to 0.62 at 1 ms, 0.31 at 0.5 ms
    # to 0.40 at 0.4 ms.
    assert set(board.loc[front, "trial_id"]) == {IDS[2], IDS[0], IDS[5]}
    assert not front[board["trial_id"] == IDS[3]].any()  # no latency, no place on the front
    minimised = pareto_front(board, "val_guarded_macro_recall", "min", "cost/latency_ms_b1")
    assert set(board.loc[minimised, "trial_id"]) == {IDS[5], IDS[1]}  # a lower objective is better under mode min

    page = write_report(results, tmp_path / "page").read_text()
    assert "<h2>Objective against cost</h2>" in page and (tmp_path / "page" / "pareto.png").is_file()
    assert f"on the front against milliseconds per image at batch 1: {IDS[2]}, {IDS[0]}, {IDS[5]}" in page
    table = page.split("<h2>Leaderboard</h2>", 1)[1].split("</table>", 1)[0]
    assert "ms / image, batch 1" in table and "params (M)" in table and "5.00" in table


def test_the_best_trials_predictions_kept_in_the_results_folder_draw_its_curves_without_the_checkpoints(tmp_path):
    results = make_results(tmp_path)
    best = pd.read_parquet(results / "leaderboard.parquet").iloc[0]
    kept = results / "predictions" / best["trial_id"]
    kept.mkdir(parents=True)
    shutil.copyfile(Path(best["checkpoint"]) / PREDICTIONS_FILE, kept / PREDICTIONS_FILE)
    summary = json.loads((results / "sweep.json").read_text())
    summary["best_predictions"] = {"trial_id": best["trial_id"],
                                   "files": [f"predictions/{best['trial_id']}/{PREDICTIONS_FILE}"]}
    (results / "sweep.json").write_text(json.dumps(summary))
    shutil.rmtree(tmp_path / "tune" / "train")  # as a committed results folder: no Tune checkpoints
    page = write_report(results, tmp_path / "page").read_text()
    assert "No precision-recall curves" not in page and "could not be drawn" not in page
    assert (tmp_path / "page" / "precision_recall.png").is_file()


def test_learning_curves_come_from_the_stored_study_with_ashas_cut_off_at_each_rung(tmp_path):
    import optuna

    from defect_tune.report.study import asha_cutoffs

    # Rungs at 1 and 2 (grace 1, factor 2, 4 epochs): at each, the top half of the values recorded there went on.
    curves = {0: {1: 0.2, 2: 0.3}, 1: {1: 0.4, 2: 0.6, 3: 0.7, 4: 0.8}, 2: {1: 0.1},
              3: {1: 0.5, 2: 0.5, 3: 0.6, 4: 0.6}}
    assert asha_cutoffs(curves, 1, 2, 4, "max") == {1: pytest.approx(0.3), 2: pytest.approx(0.5)}
    assert asha_cutoffs(curves, 1, 3, 4, "max") == {1: pytest.approx(np.percentile([0.2, 0.4, 0.1, 0.5], 100 * 2 / 3)),
                                                    3: pytest.approx(np.percentile([0.7, 0.6], 100 * 2 / 3))}
    assert asha_cutoffs(curves, 1, 2, 4, "min")[1] == pytest.approx(0.3)  # the bottom half goes on when lower is better

    results = make_results(tmp_path)
    study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{results / 'optuna.db'}", direction="maximize")
    for number, curve in curves.items():
        trial = study.ask()
        for step, value in curve.items():
            trial.report(value, step)
        study.tell(trial, None if len(curve) < 4 else curve[4],
                   state=None if len(curve) == 4 else optuna.trial.TrialState.PRUNED)
    page = write_report(results, tmp_path / "page").read_text()
    assert "<h2>Learning curves</h2>" in page and (tmp_path / "page" / "learning_curves.png").is_file()
    assert "ASHA&#x27;s cut-offs: epoch 1: 0.3000, epoch 2: 0.5000." in page
