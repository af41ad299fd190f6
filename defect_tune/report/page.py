"""`defect-tune report`: one sweep's results folder as a single self-contained HTML page.

Reads what `search` wrote (leaderboard.parquet, sweep.json, the best trial's validation
predictions) and draws one PNG per figure with matplotlib; the page embeds them as data URIs, so
report.html alone can be mailed or attached. Optuna's own analysis is reused where it reads well:
the finished trials are rebuilt into an in-memory Optuna study (ASHA-stopped trials as PRUNED,
as the sweep's searcher saw them) for `optuna.importance` and its parallel-coordinate plot.

Whatever cannot be drawn (one finished trial, predictions on remote storage, a class without
validation positives) becomes a sentence in the report saying why, never an exception.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import re
from functools import partial
from pathlib import Path

import matplotlib
import optuna

from defect_tune.core.config import OBJECTIVE, OBJECTIVE_DEFINITION
from defect_tune.core.errors import file_in_the_way, files_not_written_by
from defect_tune.report.figures import STOPS
from defect_tune.report.load import ReportError, Section, Sweep, count_text, duration_text, load_sweep, metric_text
from defect_tune.report.sections import (
    curves_section,
    errors_section,
    history_section,
    importance_section,
    leaderboard_section,
    parallel_section,
    pareto_section,
    pr_section,
    recall_section,
    savings_section,
)
from defect_tune.report.study import importances, rebuild_study

REPORT_FILE = "report.html"
# How every page write_report writes begins: an existing report.html that does not is a user's.
PAGE_START = "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>defect-tune report: "
FIGURE_FILES = ("history.png", "importances.png", "parallel_coordinates.png", "recall_per_class.png",
                "asha_savings.png", "precision_recall.png", "pareto.png", "learning_curves.png")
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False}


# The page -------------------------------------------------------------------------------------

# The page's style sheet, shipped beside this module (package data).
CSS = (importlib.resources.files("defect_tune.report") / "page.css").read_text()


def _image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _section_html(section: Section) -> str:
    anchor = re.sub(r"[^a-z0-9]+", "-", section.title.lower()).strip("-")
    parts = [f"<section id='{anchor}'><h2>{html.escape(section.title)}</h2>"]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in section.notes]
    if section.figure is None and section.caption and section.body:
        parts.append(f"<p class='caption'>{html.escape(section.caption)}</p>")
    parts.append(section.body)
    if section.figure is not None:
        parts.append(f"<figure><img alt='{html.escape(section.title)}' src='{_image(section.figure)}'>"
                     f"<figcaption>{html.escape(section.caption)}</figcaption></figure>")
    return "".join(parts) + "</section>"


def _trials(count: int, summary: dict) -> str:
    """The trials run and what bounded them: a number of trials, a time budget (sweep.json's
    num_samples is None when only that did), or both."""
    parts = [str(count)]
    if summary.get("num_samples", "?") is not None:
        parts.append(f"of a budget of {summary.get('num_samples', '?')}")
    if (summary.get("time_budget") or {}).get("seconds"):
        parts.append(f"within a time budget of {duration_text(summary['time_budget']['seconds'])}")
    return " ".join(parts)


def _header(sweep: Sweep, notes: list[str]) -> str:
    s = sweep.summary
    reasons = ", ".join(f"{STOPS.get(r, (r,))[0]} {n}" for r, n in (s.get("stop_reasons") or {}).items()) or "none"
    finished = sweep.board[sweep.board[sweep.objective].notna()]
    best = "no trial reported a value"
    if not finished.empty:
        row = finished.iloc[0]
        best = (f"trial {row['trial_id']}: {sweep.objective} {metric_text(row[sweep.objective])} "
                f"at epoch {count_text(row.get('best_epoch'))} of {count_text(row.get('epochs'))}")
    definition = (OBJECTIVE_DEFINITION if sweep.objective == OBJECTIVE
                  else "(a metric reported by every trial each epoch)")
    items = [
        ("data", s.get("data", "unknown"), False),
        ("data fingerprint", s.get("source_fingerprint") or "unknown", False),
        ("objective", f"{sweep.objective} ({'higher' if sweep.mode == 'max' else 'lower'} is better)", False),
        ("definition", definition, True),
        ("search space", s.get("space", "unknown"), False),
        ("trials", f"{_trials(len(sweep.board), s)}, up to {sweep.max_epochs} epochs each", True),
        ("stop reasons", reasons, True), ("wall time", duration_text(s.get("seconds")), True), ("best", best, True),
        ("Tune experiment", s.get("experiment", "unknown"), False),
    ]
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd{' class=text' if text else ''}>{html.escape(str(v))}</dd>"
                   for k, v, text in items)
    return (f"<h1>Sweep {html.escape(str(s.get('name', sweep.folder.name)))}</h1><dl class='summary'>{rows}</dl>"
            + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes))


def write_report(results: Path, out: Path | None = None) -> Path:
    """Write RESULTS/report/report.html (or OUT/report.html) and its PNGs; return the HTML's path."""
    sweep = load_sweep(results)
    out = Path(out) if out is not None else Path(results) / "report"
    blocker = out if out.exists() and not out.is_dir() else file_in_the_way(out)
    if blocker is not None:
        raise ReportError(f"{out}: --out is {'a file' if blocker == out else f'under {blocker}, which is a file'}; "
                          "name a folder for report.html and its figures")
    others = files_not_written_by(out, frozenset({REPORT_FILE, *FIGURE_FILES}))
    if others:  # an earlier report's files are replaced; a user's are not ours to overwrite or count
        raise ReportError(f"{out}: --out holds files report did not write ({', '.join(others[:5])}); choose a new "
                          "folder")
    if (out / REPORT_FILE).is_file() and not (out / REPORT_FILE).read_bytes().startswith(PAGE_START.encode()):
        raise ReportError(f"{out / REPORT_FILE}: exists and is not an earlier defect-tune report; refusing to "
                          "overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # an earlier report's figure that this one cannot draw must not linger
        (out / name).unlink(missing_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, notes = rebuild_study(sweep)
    try:
        values, reason = importances(study)
    except Exception as error:  # noqa: BLE001 - Optuna's estimator on unusual data must not cost the report
        values, reason = {}, ("No parameter importances: Optuna could not compute them "
                              f"({type(error).__name__}: {error}).")
    ranked = list(values) or sweep.params
    builders = [
        partial(leaderboard_section, sweep), partial(pareto_section, sweep, out), partial(history_section, sweep, out),
        partial(importance_section, study, values, reason, out), partial(parallel_section, sweep, study, ranked, out),
        partial(recall_section, sweep, out), partial(curves_section, sweep, out), partial(savings_section, sweep, out),
        partial(pr_section, sweep, out),
        partial(errors_section, sweep),
    ]
    sections = []
    with matplotlib.rc_context(STYLE):  # also undoes any style a library sets while drawing
        for build in builders:
            try:
                sections.append(build())
            except Exception as error:  # noqa: BLE001 - one figure's failure must not cost the whole report
                title = build.func.__name__.removesuffix("_section").replace("_", " ").capitalize()
                sections.append(Section(title,
                                        notes=[f"This section could not be drawn: {type(error).__name__}: {error}"]))
    sections = [s for s in sections if s is not None]
    nav = "<nav>" + "".join(
        f"<a href='#{re.sub(r'[^a-z0-9]+', '-', s.title.lower()).strip('-')}'>{html.escape(s.title)}</a>"
        for s in sections
    ) + "</nav>"
    page = (
        f"{PAGE_START}{html.escape(str(sweep.summary.get('name', '')))}</title><style>{CSS}</style></head>"
        f"<body>{_header(sweep, notes)}{nav}{''.join(_section_html(s) for s in sections)}</body></html>\n"
    )
    path = out / REPORT_FILE
    path.write_text(page)
    return path


def figures_written(report: Path) -> list[str]:
    """The figures beside `report` that its run drew (write_report removes earlier ones first)."""
    return [name for name in FIGURE_FILES if (Path(report).parent / name).is_file()]
