"""The command line as users run it: a real subprocess of `python -m defect_tune`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def defect_tune(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "defect_tune", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_prepare_prints_a_summary_and_records_the_command(small_voc, tmp_path):
    out = tmp_path / "out"
    result = defect_tune(
        "prepare", small_voc, "--format", "voc", "--out", out, "--image-size", "16", "--split", "0.6,0.2,0.2",
        "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "crack" in result.stderr and "multi-label" in result.stderr and "images/s" in result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"].startswith("defect-tune prepare ") and "--seed 3" in meta["command"]
    assert meta["split_fractions"] == {"train": 0.6, "val": 0.2, "test": 0.2}


def test_a_fault_of_ours_keeps_its_traceback(synthetic_data, tmp_path):
    """Only bad input (a UserError) is cut to one line: a plain ValueError raised inside training,
    which is a bug of ours, must reach the user with its traceback and exit 1."""
    program = textwrap.dedent("""
        import sys
        import defect_tune.training.train as train
        def fit(*args, **kwargs):
            raise ValueError("a bug of ours")
        train.fit = fit
        from defect_tune.cli import app
        app(["train", "--data", sys.argv[1], "--out", sys.argv[2]])
    """)
    result = subprocess.run([sys.executable, "-c", program, str(synthetic_data), str(tmp_path / "t")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "ValueError: a bug of ours" in result.stderr
    assert "error: " not in result.stderr


def test_prepare_errors_exit_2_with_the_reason(small_voc, tmp_path):
    (small_voc / "JPEGImages" / "scratch_005.jpg").write_bytes(b"junk")
    result = defect_tune("prepare", small_voc, "--out", tmp_path / "out", "--image-size", "16", "--strict")
    assert result.returncode == 2
    assert "scratch_005.jpg: cannot decode" in result.stderr
    assert "Traceback" not in result.stderr

    result = defect_tune("prepare", tmp_path / "nowhere", "--out", tmp_path / "out2")
    assert result.returncode == 2 and "nowhere/JPEGImages: not found" in result.stderr

    result = defect_tune("prepare", small_voc, "--out", tmp_path / "out3", "--split", "0.7/0.3")
    assert result.returncode == 2 and "three fractions" in result.stderr


def test_search_refuses_counts_that_cannot_work_before_starting_ray(synthetic_data, tmp_path):
    for index, (args, message) in enumerate((
        (["--cv", "five"], "--cv takes a number of folds or auto, got 'five'"),
        (["--cv", "1"], "--cv must be 0"),
        (["--trials-per-gpu", "four"], "--trials-per-gpu takes a number of workers per GPU or auto, got 'four'"),
        (["--trials-per-gpu", "0"], "--trials-per-gpu takes a positive number of workers per GPU or auto, got 0"),
        (["--trials-per-gpu", "4", "--gpus-per-worker", "0.5"],
         "--trials-per-gpu 4 sets each worker's GPU share; drop --gpus-per-worker 0.5"),
        (["--time-budget", "0"],
         "--time-budget '0': expected a positive duration such as 90s, 20m, 1.5h or 600 (seconds)"),
        (["--time-budget", "-5m"], "--time-budget '-5m': expected a positive duration"),
        (["--time-budget", "abc"], "--time-budget 'abc': expected a positive duration"),
    )):
        out = tmp_path / str(index)
        result = defect_tune("search", "--data", synthetic_data, *args, "--out", out)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not out.exists()


def test_search_checks_the_sweep_name_before_starting_ray(synthetic_data, tmp_path):
    out = tmp_path / "out"
    results = [defect_tune("search", "--data", synthetic_data, "--resume", "--out", out)]
    assert results[-1].returncode == 2, results[-1].stderr
    assert "--resume needs the --name of the sweep to continue" in results[-1].stderr

    results.append(defect_tune("search", "--data", synthetic_data, "--name", "demo", "--resume", "--out", out))
    assert results[-1].returncode == 2, results[-1].stderr
    assert f"--resume: no sweep 'demo' to resume at {out}/tune/demo" in results[-1].stderr
    assert not out.exists()

    (out / "tune" / "demo").mkdir(parents=True)
    (out / "tune" / "demo" / "tuner.pkl").write_bytes(b"")  # the file Tune's Tuner.can_restore looks for
    results.append(defect_tune("search", "--data", synthetic_data, "--name", "demo", "--out", out))
    assert results[-1].returncode == 2, results[-1].stderr
    assert f"sweep 'demo' already exists at {out}/tune/demo; --resume continues it" in results[-1].stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["tune", "tune/demo", "tune/demo/tuner.pkl"]
    for result in results:
        assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr


def test_version_and_help_show_the_choices_and_the_key_value_arguments():
    from typing import get_args

    from defect_tune import __version__
    from defect_tune.cli import Fit, Format
    from defect_tune.data.choices import FITS, FORMATS

    version = defect_tune("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"defect-tune {__version__}"
    assert get_args(Format) == FORMATS and get_args(Fit) == FITS
    wide = dict(os.environ, COLUMNS="250")  # one table row per option
    help_text = subprocess.run([sys.executable, "-m", "defect_tune", "prepare", "--help"], capture_output=True,
                               text=True, env=wide, timeout=300).stdout
    assert "voc|severstal|folders|csv|elpv|synthetic" in help_text and "pad|keep|tile|squash" in help_text
    train_help = defect_tune("train", "--help").stdout
    assert "[key=value ...]" in train_help  # not eaten as rich markup
    assert "train [OPTIONS] [KEY=VALUE]..." in train_help
    # A flag shows no value type; the options that take a value show theirs.
    assert "<bool>" not in help_text and "<bool>" not in defect_tune("jobs", "stop", "--help").stdout
    assert "--strict" in help_text and "<int>" in help_text
    refused = defect_tune("prepare", "somewhere", "--format", "yolo")
    assert refused.returncode == 2 and "'yolo' is not one of" in refused.stderr


@pytest.mark.slow
def test_the_python_api_example_runs_as_documented(tmp_path):
    """The example in defect_tune/api.py's docstring, run as a notebook would: prepare, a real
    two-trial sweep on a local Ray cluster, the leaderboard and the winner's config, the report,
    the export, a retraining and predictions on the images the data came from."""
    import defect_tune.api

    example = textwrap.dedent(defect_tune.api.__doc__.split("\n\n", 1)[1].split("\nEvery function", 1)[0])
    example += ("\nassert len(board) == 2 and summary['trials'] == 2 and summary['overrides'] == {'epochs': 1}"
                "\nassert config.lr == 3e-4 and api.best_config('results/notebook').epochs == 1"
                "\nassert page.name == 'report.html' and exported['sweep']['rank'] == 1 and exported['best_epoch'] == 1"
                "\nassert len(preds) == 300 and preds['error'].isna().all()"
                "\nassert list(preds.columns[preds.columns.str.startswith('prob/')]) == "
                "[f'prob/{c}' for c in exported['data']['classes']]"
                "\nprint('ran')\n")
    ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert ran.returncode == 0 and ran.stdout.strip().endswith("ran"), ran.stderr[-3000:]
    assert (tmp_path / "results" / "notebook" / "leaderboard.csv").is_file()
    assert (tmp_path / "results" / "notebook" / "report" / "report.html").is_file()
    assert {"model.onnx", "model.json", "MODEL_CARD.md"} <= {p.name for p in
                                                             (tmp_path / "models" / "notebook").iterdir()}
    assert (tmp_path / "preds.csv").read_text().startswith("path,")
    # What a sweep, an export and a retraining record names no path of this machine: the folders
    # can move, and paths read as the user gave them (relative here).
    records = [tmp_path / "results" / "notebook" / name for name in
               ("sweep.json", "leaderboard.csv", "best_config.yaml", "trial_configs.json", "best.yaml",
                "report/report.html")]
    records += [tmp_path / "models" / "notebook" / name for name in ("model.json", "MODEL_CARD.md", "metrics.json")]
    assert not [path.name for path in records if str(tmp_path) in path.read_text()]
