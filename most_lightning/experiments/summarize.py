"""Collect runs into one CSV, a Markdown table (mean +- std over seeds per cell) and PNG plots.

    python -m most_lightning.experiments.summarize logs/router_ablation/multirun/2026-11-26_01-00-00
    python -m most_lightning.experiments.summarize <multirun dir> ... --study sqlite:///logs/optuna/split_ratio.db \
        --study-name split_ratio --metrics val/nll test/asr_wer --out results/

Sources: Hydra multirun directories (one job subdirectory each) and/or an Optuna study (storage URL + name), and
runs.csv files of earlier summaries (runs summarised on another machine, their folders gone; a run folder given
too replaces its row).
A job directory's config comes from config_resolved.yaml (else .hydra/config.yaml), its metrics from
metrics.json, its git commit from provenance.json. An eval suite run later on one of the job's own checkpoints, with
its run directory inside the job's (`python run.py mode=eval ckpt_path=<job>/checkpoints/<ckpt>
hydra.run.dir=<job>/<name>`), adds its metrics as eval/<task>/<metric> where metrics.json lacks them (the
runs.csv column later_evals names the reports used). Runs are never dropped: a job without metrics.json is
"failed", an Optuna trial keeps its state (pruned / failed with the reason), and a job the sweep asked for
(the grid in multirun.yaml) without a directory is "missing".

Writes into --out: runs.csv (every run: status, reason, cell, seed, metrics, flattened config), summary.md
(cells x metrics, mean +- std over complete runs, with run counts by status), cells_<source>.png (metric per
cell, one point per seed), split_ratio.png (metric vs model.audio_expert_fraction, when it varies),
expert_load_<cell>.png (layers x experts per modality, from the runs' expert_load_test.csv), and for a study
optuna_history.png, optuna_importance.png, optuna_intermediate.png.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

STATUSES = ("complete", "pruned", "failed", "missing")
SPLIT_KEY = "model.audio_expert_fraction"


@dataclass
class Run:
    source: str
    status: str
    run_dir: str | None = None
    reason: str = ""
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # flattened
    metrics: dict[str, float | None] = field(default_factory=dict)
    trial_number: int | None = None
    git_commit: str | None = None
    later_evals: list[str] = field(default_factory=list)

    def value(self, key: str) -> Any:
        if key in self.config:
            return self.config[key]
        # a missing run only has its overrides; a group choice (router=vanilla) stands for its name (router.name)
        given = dict(o.lstrip("+").partition("=")[::2] for o in self.overrides)
        for candidate in (key, key.split(".")[0]):
            if candidate in given:
                return _parse_scalar(given[candidate])
        return None


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(node, list):
        out[prefix[:-1]] = json.dumps(node)
    else:
        out[prefix[:-1]] = node
    return out


def _load_config(run_dir: Path) -> dict[str, Any]:
    resolved = run_dir / "config_resolved.yaml"
    raw = run_dir / ".hydra" / "config.yaml"  # unresolved (a run that died before writing config_resolved.yaml)
    for path in (resolved, raw):
        if path.is_file():
            return _router_named_by_target(flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
    return {}


def _router_named_by_target(config: dict[str, Any]) -> dict[str, Any]:
    """router.name of a run whose router was given by ``_target_`` (on top of a file's name): the target
    class's label, as run.py saves it now; the dotted path itself when the class cannot be imported here."""
    target = config.get("router._target_")
    if target:
        from most_lightning.model.router import UnknownRouterError, router_label

        try:
            config["router.name"] = router_label({"_target_": target})
        except UnknownRouterError:
            config["router.name"] = target
    return config


def _load_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def later_eval_metrics(run_dir: Path) -> dict[str, tuple[float, str]]:
    """{"eval/<task>/<metric>": (value, report path)} from eval reports in run_dir's subdirectories that evaluated
    one of run_dir's own checkpoints. Two reports giving the same metric is an error."""
    from most_lightning.eval.report import run_metrics

    metrics: dict[str, tuple[float, str]] = {}
    for report_path in sorted(run_dir.glob("*/eval_report.json")):
        report = json.loads(report_path.read_text())
        checkpoint = Path(report.get("checkpoint", {}).get("path") or "")
        if checkpoint.resolve() != (run_dir / "checkpoints" / checkpoint.name).resolve():
            continue
        for key, value in run_metrics(report).items():
            if key in metrics:
                raise ValueError(f"{key} of {run_dir} is given by two later evaluations, {metrics[key][1]} and "
                                 f"{report_path}: keep one")
            metrics[key] = (value, str(report_path))
    return metrics


def load_run_dir(run_dir: Path, source: str) -> Run:
    run = Run(source=source, status="failed", run_dir=str(run_dir), overrides=_load_overrides(run_dir),
              config=_load_config(run_dir))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        run.metrics = json.loads(metrics_path.read_text())
        run.status = "complete"
        added = {k: v for k, v in later_eval_metrics(run_dir).items() if k not in run.metrics}
        run.metrics.update({k: value for k, (value, _) in added.items()})
        run.later_evals = sorted({report for _, report in added.values()})
    else:
        run.reason = "no metrics.json: the job stopped before the end (see its run.log)"
    provenance = run_dir / "provenance.json"
    if provenance.is_file():
        run.git_commit = json.loads(provenance.read_text()).get("git", {}).get("commit")
    for override in run.overrides:
        if override.lstrip("+").startswith("optuna_trial.number="):
            run.trial_number = int(override.split("=", 1)[1])
    return run


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / ".hydra").is_dir() or (path / "metrics.json").is_file())


def expected_jobs(multirun_dir: Path) -> list[list[str]] | None:
    """The job override lists a basic-sweeper grid asked for (from multirun.yaml), or None if not a grid."""
    path = multirun_dir / "multirun.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    sweeper = cfg.hydra.get("sweeper", {})
    if "basic_sweeper" not in str(sweeper.get("_target_", "")):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    lines = [*params, *cfg.hydra.overrides.task]
    axes: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(combo) for combo in itertools.product(*axes.values())]


def load_multirun(multirun_dir: Path) -> list[Run]:
    source = multirun_dir.name
    runs = [load_run_dir(p, source) for p in sorted(multirun_dir.iterdir(), key=_job_order) if is_run_dir(p)]
    expected = expected_jobs(multirun_dir)
    if expected:
        have = [sorted(r.overrides) for r in runs]
        for combo in expected:
            if sorted(combo) not in have:
                runs.append(Run(source=source, status="missing", overrides=combo,
                                reason="in the sweep's grid (multirun.yaml) but no job directory"))
    return runs


RUNS_CSV_FIELDS = ("source", "status", "reason", "run_dir", "trial_number", "git_commit", "later_evals", "overrides")


def _csv_value(text: str) -> Any:
    return {"True": True, "False": False}.get(text, _parse_scalar(text))


def load_runs_csv(path: Path) -> list[Run]:
    """The runs of a runs.csv this module wrote, as they were summarised: a study's earlier runs whose folders
    are not on this machine. A column is a metric unless it is one of the fixed fields or names a config key
    (the seed and cell columns repeat config values)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    if not set(RUNS_CSV_FIELDS) <= set(header):
        raise SystemExit(f"{path}: not a runs.csv written by this summariser (it needs the columns "
                         f"{', '.join(RUNS_CSV_FIELDS)})")
    config_keys = {c.removeprefix("config.") for c in header if c.startswith("config.")}
    metric_keys = [c for c in header
                   if c not in RUNS_CSV_FIELDS and not c.startswith("config.") and c not in config_keys]
    runs = []
    for row in rows:
        runs.append(Run(
            source=row["source"], status=row["status"], reason=row["reason"], run_dir=row["run_dir"] or None,
            trial_number=int(row["trial_number"]) if row["trial_number"] else None,
            git_commit=row["git_commit"] or None, later_evals=row["later_evals"].split(),
            overrides=row["overrides"].split(),
            config={k: _csv_value(row[f"config.{k}"]) for k in config_keys if row[f"config.{k}"] != ""},
            metrics={k: float(row[k]) for k in metric_keys if row[k] != ""}))
    return runs


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def load_study_runs(storage: str, study_name: str | None, known: dict[str, Run]) -> tuple[list[Run], Any]:
    """Trials of an Optuna study; a trial whose job directory is already among `known` updates that run."""
    import optuna

    from most_lightning.experiments.optuna_setup import make_storage
    from most_lightning.experiments.sweep_loop import FAIL_REASON, OUTPUT_DIR

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = make_storage(storage)
    if study_name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage_obj)]
        if len(names) != 1:
            raise SystemExit(f"{storage} holds studies {names}: name one with --study-name")
        study_name = names[0]
    study = optuna.load_study(study_name=study_name, storage=storage_obj)
    new_runs = []
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name.lower()
        status = {"complete": "complete", "pruned": "pruned", "fail": "failed"}.get(state, state)
        reason = trial.user_attrs.get(FAIL_REASON) or trial.user_attrs.get("pruned_reason") or ""
        out_dir = trial.user_attrs.get(OUTPUT_DIR)
        run = known.get(str(Path(out_dir).resolve())) if out_dir else None
        if run is None:
            run = load_run_dir(Path(out_dir), study_name) if out_dir and Path(out_dir).is_dir() else \
                Run(source=study_name, status=status, overrides=[f"{k}={v}" for k, v in trial.params.items()])
            new_runs.append(run)
        run.status, run.reason, run.trial_number = status, reason or run.reason, trial.number
        if status == "complete" and trial.values and not run.metrics:
            run.metrics = {f"objective_{i}": v for i, v in enumerate(trial.values)}
    return new_runs, study


def cell_of(run: Run, cell_keys: list[str]) -> tuple:
    return tuple(run.value(k) for k in cell_keys)


def auto_cell_keys(runs: list[Run], seed_key: str) -> list[str]:
    """The override keys that vary across runs (minus the seed and the sweeper's bookkeeping)."""
    keys: dict[str, set] = defaultdict(set)
    for run in runs:
        for override in run.overrides:
            k, _, v = override.lstrip("+").partition("=")
            if k != seed_key and not k.startswith(("optuna_trial.", "hydra.")):
                keys[k].add(v)
    return sorted(k for k, values in keys.items() if len(values) > 1) or sorted(keys)[:1]


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def aggregate(runs: list[Run], cell_keys: list[str], metrics: list[str], seed_key: str) -> list[dict[str, Any]]:
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        cells[cell_of(run, cell_keys)].append(run)
    rows = []
    for cell, members in sorted(cells.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        row: dict[str, Any] = dict(zip(cell_keys, cell))
        for status in STATUSES:
            row[f"n_{status}"] = sum(r.status == status for r in members)
        row["seeds"] = " ".join(str(r.value(seed_key)) for r in members if r.status == "complete")
        for metric in metrics:
            values = [r.metrics.get(metric) for r in members if r.status == "complete"]
            values = [v for v in values if v is not None and math.isfinite(v)]
            row[f"{metric}:mean"] = statistics.fmean(values) if values else None
            row[f"{metric}:std"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{metric}:n"] = len(values)
        rows.append(row)
    return rows


# two-sided 5% critical values of Student's t by degrees of freedom (1..10); beyond: the normal's 1.96
T_CRITICAL_5 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                10: 2.228}


class UnpairedSeedsError(ValueError):
    """The cells of a study were not run on the same seeds, so a per-seed (paired) comparison is impossible."""


def seeds_by_cell(runs: list[Run], cell_keys: list[str], seed_key: str) -> dict[tuple, list]:
    """The seeds of the complete runs of each cell; every cell must have the same seeds (each seed once), else
    UnpairedSeedsError naming the cells and their seeds."""
    cells: dict[tuple, list] = defaultdict(list)
    for run in runs:
        if run.status == "complete":
            cells[cell_of(run, cell_keys)].append(run.value(seed_key))
    shown = "; ".join(f"{_cell_name(c, cell_keys)}: {sorted(map(str, s))}"
                      for c, s in sorted(cells.items(), key=str))
    for cell, seeds in cells.items():
        if len(set(map(str, seeds))) != len(seeds):
            raise UnpairedSeedsError(f"{_cell_name(cell, cell_keys)} ran seed(s) more than once ({seeds}): the "
                                     f"seed list ({seed_key}) must give each cell each seed once. Cells: {shown}")
    distinct = {tuple(sorted(map(str, s))) for s in cells.values()}
    if len(distinct) > 1:
        raise UnpairedSeedsError(f"the seed list does not divide into the study's cells: a paired comparison needs "
                                 f"the same seeds ({seed_key}) in every cell. Cells: {shown}")
    return dict(cells)


def _cell_name(cell: tuple, cell_keys: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_show(v)}" for k, v in zip(cell_keys, cell))


def comparison_pairs(cells: list[tuple], reference: tuple | None = None) -> list[tuple[tuple, tuple]]:
    """(cell, reference) pairs to compare. With one cell key (or a reference given): every cell against the
    reference (default: the first). With several keys (a factorial grid): every two cells that differ in exactly
    one key, each factor's effect at each level of the others, the later cell minus the earlier."""
    if reference is not None or len(cells[0]) < 2:
        reference = reference if reference is not None else cells[0]
        return [(cell, reference) for cell in cells if cell != reference]
    return [(b, a) for a, b in itertools.combinations(cells, 2) if sum(x != y for x, y in zip(a, b)) == 1]


def paired_differences(runs: list[Run], cell_keys: list[str], metrics: list[str], seed_key: str,
                       reference: tuple | None = None) -> list[dict[str, Any]]:
    """For every pair of `comparison_pairs`, per metric: the per-seed differences' mean, std, t statistic and
    whether |t| exceeds the two-sided 5% critical value (the difference exceeds the seed noise); also the smallest
    difference the study could detect at this noise (t_crit * std / sqrt(n))."""
    cells = seeds_by_cell(runs, cell_keys, seed_key)
    if not cells:
        return []
    order = sorted(cells, key=lambda c: tuple(str(v) for v in c))
    value = {(cell_of(r, cell_keys), str(r.value(seed_key))): r.metrics for r in runs if r.status == "complete"}
    rows = []
    for cell, base in comparison_pairs(order, reference):
        for metric in metrics:
            diffs = [value[(cell, str(s))].get(metric, math.nan) - value[(base, str(s))].get(metric, math.nan)
                     for s in cells[cell]]
            diffs = [d for d in diffs if math.isfinite(d)]
            n = len(diffs)
            row = {"cell": _cell_name(cell, cell_keys), "reference": _cell_name(base, cell_keys), "metric": metric,
                   "n": n, "mean": statistics.fmean(diffs) if diffs else None,
                   "std": statistics.stdev(diffs) if n > 1 else None}
            if n > 1:
                t_crit = T_CRITICAL_5.get(n - 1, 1.96)
                se = row["std"] / math.sqrt(n)
                row["t"] = row["mean"] / se if se > 0 else math.copysign(math.inf, row["mean"] or 1.0)
                row["exceeds_noise"] = abs(row["t"]) > t_crit
                row["detectable"] = t_crit * se
            rows.append(row)
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| cell - reference | metric | seeds | mean diff ± std | t | exceeds noise (5%) | smallest detectable |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "–" if r.get("t") is None else f"{r['t']:.2f}"
        lines.append(f"| {r['cell']} - {r['reference']} | {r['metric']} | {r['n']} | {_fmt(r['mean'])} ± "
                     f"{_fmt(r['std'])} | {t} | {'yes' if r.get('exceeds_noise') else 'no'} | "
                     f"{_fmt(r.get('detectable'))} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict[str, Any]], cell_keys: list[str], metrics: list[str]) -> str:
    header = [*cell_keys, "runs (ok/pruned/failed/missing)", "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        counts = "/".join(str(row[f"n_{s}"]) for s in STATUSES)
        cells = [_show(row[k]) for k in cell_keys] + [counts, row["seeds"] or "–"]
        for metric in metrics:
            mean, std = row[f"{metric}:mean"], row[f"{metric}:std"]
            cells.append("–" if mean is None else f"{_fmt(mean)} ± {_fmt(std)}" if std is not None else _fmt(mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_runs_csv(path: Path, runs: list[Run], cell_keys: list[str], seed_key: str) -> None:
    metric_names = sorted({m for r in runs for m in r.metrics})
    config_names = sorted({c for r in runs for c in r.config})
    header = ["source", "status", "reason", "run_dir", "trial_number", "git_commit", "later_evals", "overrides",
              seed_key, *cell_keys, *metric_names, *(f"config.{c}" for c in config_names)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in runs:
            writer.writerow([r.source, r.status, r.reason, r.run_dir or "", r.trial_number, r.git_commit or "",
                             " ".join(r.later_evals), " ".join(r.overrides), r.value(seed_key),
                             *(r.value(k) for k in cell_keys),
                             *(r.metrics.get(m) for m in metric_names), *(r.config.get(c) for c in config_names)])


# ---- plots -----------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(cell: tuple, cell_keys: list[str]) -> str:
    return "\n".join(f"{k.split('.')[-1]}={_show(v)}" for k, v in zip(cell_keys, cell))


def plot_cells(path: Path, runs: list[Run], cell_keys: list[str], metrics: list[str], title: str) -> None:
    plt = _plt()
    cells = sorted({cell_of(r, cell_keys) for r in runs}, key=lambda c: tuple(str(v) for v in c))
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.5, 0.8 * len(cells) + 1.5) * ncols, 4.2 * nrows),
                             squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        for i, cell in enumerate(cells):
            members = [r for r in runs if cell_of(r, cell_keys) == cell]
            values = [r.metrics.get(metric) for r in members if r.status == "complete"]
            values = [v for v in values if v is not None and math.isfinite(v)]
            if values:
                ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.6, s=18, zorder=3)
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                ax.errorbar([i], [mean], yerr=[std], fmt="_", color="black", markersize=16, capsize=4, zorder=4)
            bad = [r.status for r in members if r.status != "complete"]
            if bad:  # failed / pruned / missing runs are shown, not dropped
                ax.annotate(", ".join(f"{bad.count(s)} {s}" for s in dict.fromkeys(bad)), (i, 0.02),
                            xycoords=("data", "axes fraction"), ha="center", fontsize=7, color="tab:red")
        ax.set_xticks(range(len(cells)), [_label(c, cell_keys) for c in cells], fontsize=7, rotation=40,
                      ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: mean ± std over seeds (dots: runs)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_split_ratio(path: Path, runs: list[Run], metrics: list[str], group_keys: list[str]) -> None:
    """Each metric against the split ratio, one line per combination of the other cell keys."""
    plt = _plt()
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        groups: dict[Any, list[tuple[float, float]]] = defaultdict(list)
        for r in runs:
            value, x = r.metrics.get(metric), r.value(SPLIT_KEY)
            if r.status == "complete" and value is not None and x is not None and math.isfinite(value):
                groups[", ".join(f"{k.split('.')[-1]}={_show(r.value(k))}" for k in group_keys)].append(
                    (float(x), value))
        for group, points in sorted(groups.items(), key=lambda kv: str(kv[0])):
            xs, ys = zip(*points)
            (line,) = ax.plot([], [], label=str(group))
            ax.scatter(xs, ys, alpha=0.5, s=16, color=line.get_color())
            by_x: dict[float, list[float]] = defaultdict(list)
            for x, y in points:
                by_x[x].append(y)
            mx = sorted(by_x)
            ax.plot(mx, [statistics.fmean(by_x[x]) for x in mx], color=line.get_color(), marker="o", markersize=3)
        pruned = [r.value(SPLIT_KEY) for r in runs if r.status in ("pruned", "failed") and r.value(SPLIT_KEY)]
        for x in pruned:
            ax.axvline(float(x), color="tab:red", alpha=0.25, linestyle=":")
        ax.set_xlabel("audio expert fraction")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("metric vs expert split ratio (line: mean per fraction; red dotted: pruned/failed trials)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load_of_run(path: Path, run: Run, stage: str = "test") -> bool:
    """Re-draw the run's expert_load_<stage>.csv (written by ExpertLoadMonitor) as its layers x experts heatmap."""
    import torch

    from most_lightning.lit.callbacks import plot_expert_load
    from most_lightning.marks import MODALITY_NAMES

    source = Path(run.run_dir or "") / f"expert_load_{stage}.csv"
    if not source.is_file():
        return False
    with open(source) as f:
        rows = list(csv.DictReader(f))
    layers = sorted({int(r["layer"]) for r in rows})
    n_experts = 1 + max(int(r["expert"]) for r in rows)
    frac = torch.zeros(len(layers), len(MODALITY_NAMES), n_experts)
    audio = set()
    for r in rows:
        frac[layers.index(int(r["layer"])), MODALITY_NAMES.index(r["modality"]), int(r["expert"])] = float(
            r["load_fraction"])
        if r["group"] == "audio":
            audio.add(int(r["expert"]))
    plot_expert_load(path, frac, layers, audio, title=f"expert load ({stage}): {path.stem.removeprefix('expert_load_')}")
    return True


def plot_study(out: Path, study) -> list[Path]:
    import warnings

    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    plt = _plt()
    written = []
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return written
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    plots = [("optuna_history.png", lambda: ovm.plot_optimization_history(study, target=target)),
             ("optuna_intermediate.png", lambda: ovm.plot_intermediate_values(study))]
    if len(complete) > 1 and len(study.best_trials[0].params) >= 1:
        plots.append(("optuna_importance.png", lambda: ovm.plot_param_importances(study, target=target)))
    for name, draw in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
            try:
                ax = draw()
            except (ValueError, RuntimeError) as err:  # e.g. importance of a parameter that never varied
                print(f"skipped {name}: {err}")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("_")


def summarize(sources: list[str], out: Path, study_storage: str | None = None, study_name: str | None = None,
              metrics: list[str] | None = None, cell_keys: list[str] | None = None, seed_key: str = "seed",
              heatmap_runs: list[str] | None = None, n_heatmaps: int = 4) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    earlier: list[Run] = []  # from runs.csv files; a run folder loaded here replaces its row
    for source in sources:
        path = Path(source)
        if source.startswith(("sqlite:", "journal:", "postgresql:", "mysql:")):
            study_storage = source
        elif path.suffix == ".csv" and path.is_file():
            earlier.extend(load_runs_csv(path))
        elif is_run_dir(path) and not (path / "multirun.yaml").is_file():
            runs.append(load_run_dir(path, path.parent.name))
        elif path.is_dir():
            runs.extend(load_multirun(path))
        else:
            raise SystemExit(f"{source}: not a run directory, a multirun directory, a runs.csv or a storage URL")
    on_disk = {str(Path(r.run_dir)) for r in runs if r.run_dir}
    runs = [r for r in earlier if not r.run_dir or str(Path(r.run_dir)) not in on_disk] + runs
    study = None
    if study_storage:
        known = {str(Path(r.run_dir).resolve()): r for r in runs if r.run_dir}
        extra, study = load_study_runs(study_storage, study_name, known)
        runs.extend(extra)
    if not runs:
        raise SystemExit(f"no runs found in {sources}")
    cell_keys = cell_keys or auto_cell_keys(runs, seed_key)
    if not metrics:
        metrics = [m for m in ("val/nll", "test/asr_wer", "test/tts_unit_nll", "test/text_nll")
                   if any(m in r.metrics for r in runs)] or sorted({m for r in runs for m in r.metrics})[:4]
    write_runs_csv(out / "runs.csv", runs, cell_keys, seed_key)
    written = [out / "runs.csv"]
    sections = []
    by_source: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_source[run.source].append(run)
    for source, members in by_source.items():
        rows = aggregate(members, cell_keys, metrics, seed_key)
        sections.append(f"## {source}\n\n{markdown_table(rows, cell_keys, metrics)}")
        png = out / f"cells_{_slug(source)}.png"
        plot_cells(png, members, cell_keys, metrics, source)
        written.append(png)
    all_rows = aggregate(runs, cell_keys, metrics, seed_key)
    if len(by_source) > 1:
        sections.append(f"## all sources pooled by cell\n\n{markdown_table(all_rows, cell_keys, metrics)}")
    if len({cell_of(r, cell_keys) for r in runs}) > 1 and any(r.value(seed_key) is not None for r in runs):
        try:
            paired = paired_differences(runs, cell_keys, metrics, seed_key)
        except UnpairedSeedsError as err:
            if not any(r.status != "complete" for r in runs):
                raise  # every run completed, so the seed list itself does not divide into the cells
            paired = []  # runs that failed or are missing break the pairing: say so instead of comparing
            sections.append(f"## paired by seed: not possible\n\n{err}\n")
        if paired:
            sections.append("## paired by seed (cell minus reference: with one cell key each cell against the "
                            "first, with several every two cells that differ in one key; t against the two-sided "
                            "5% critical value)\n\n" + paired_table(paired))
    problems = [r for r in runs if r.status != "complete"]
    if problems:
        sections.append("## runs that did not complete\n\n" + "\n".join(
            f"- {r.source} {r.run_dir or ' '.join(r.overrides)} (trial {r.trial_number}): **{r.status}** {r.reason}"
            for r in problems) + "\n")
    (out / "summary.md").write_text(
        f"# Summary of {', '.join(sources)}{' + study ' + study.study_name if study else ''}\n\n"
        f"Mean ± std over complete runs per cell (std needs two runs); counts by status.\n\n" + "\n".join(sections))
    written.append(out / "summary.md")
    if len({r.value(SPLIT_KEY) for r in runs if r.status == "complete"}) > 2:
        plot_split_ratio(out / "split_ratio.png", runs, metrics, [k for k in cell_keys if k != SPLIT_KEY])
        written.append(out / "split_ratio.png")
    chosen = [r for r in runs if r.run_dir and heatmap_runs and any(Path(r.run_dir) == Path(h) for h in heatmap_runs)]
    if not heatmap_runs:  # one run (lowest seed) per cell of the first source
        first = next(iter(by_source.values()))
        for cell in sorted({cell_of(r, cell_keys) for r in first}, key=lambda c: tuple(str(v) for v in c)):
            members = sorted((r for r in first if cell_of(r, cell_keys) == cell and r.status == "complete"
                              and Path(r.run_dir or "", "expert_load_test.csv").is_file()),
                             key=lambda r: str(r.value(seed_key)))
            if members and len(chosen) < n_heatmaps:
                chosen.append(members[0])
    for run in chosen:
        name = _slug("_".join(f"{k.split('.')[-1]}-{_show(run.value(k))}" for k in cell_keys) + f"_seed-{run.value(seed_key)}")
        if plot_expert_load_of_run(out / f"expert_load_{name}.png", run):
            written.append(out / f"expert_load_{name}.png")
    if study is not None:
        written.extend(plot_study(out, study))
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    print(f"{len(runs)} runs ({counts}); wrote " + ", ".join(str(p) for p in written))
    print((out / "summary.md").read_text())
    return {"runs": runs, "rows": all_rows, "written": written, "cell_keys": cell_keys, "metrics": metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m most_lightning.experiments.summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+",
                        help="multirun dirs, run dirs, runs.csv files of earlier summaries, or an Optuna storage URL")
    parser.add_argument("--study", help="Optuna storage URL (sqlite:///..., journal:///...)")
    parser.add_argument("--study-name", help="study in that storage (needed if it holds several)")
    parser.add_argument("--metrics", nargs="+", help="metrics for the table and plots (default: a few headline ones)")
    parser.add_argument("--cell-keys", nargs="+", help="config keys that define a cell (default: the varied overrides)")
    parser.add_argument("--seed-key", default="seed")
    parser.add_argument("--heatmap-runs", nargs="+", help="run dirs to draw expert-load heatmaps for")
    parser.add_argument("--heatmaps", type=int, default=4, help="else: one run per cell of the first source, up to N")
    parser.add_argument("--out", default=None, help="output folder (default: <first source>/summary)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.sources[0]) / "summary"
    summarize(args.sources, out, args.study, args.study_name, args.metrics, args.cell_keys, args.seed_key,
              args.heatmap_runs, args.heatmaps)


if __name__ == "__main__":
    main()
