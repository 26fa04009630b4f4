"""eval_report.json + eval_report.md: one entry per task with its metrics, counts, settings and examples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from most_lightning.lit.runtime import write_json

REPORT_JSON, REPORT_MD = "eval_report.json", "eval_report.md"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """{"<task>/<metric>": value} over all tasks (numbers only)."""
    out = {}
    for task, result in report.get("tasks", {}).items():
        for name, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}/{name}"] = float(value)
    return out


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's metrics as a training run records them: {"eval/<task>/<metric>": value}."""
    return {f"eval/{name}": value for name, value in flat_metrics(report).items()}


def markdown_table(report: dict[str, Any]) -> str:
    head = report.get("checkpoint", {})
    lines = [f"# Eval report: suite `{report.get('suite', '?')}`", "",
             f"checkpoint: `{head.get('path', '?')}` (step {head.get('global_step', '?')}), "
             f"router `{report.get('router', '?')}`", "", "| task | metric | value |", "|---|---|---|"]
    for task, result in report.get("tasks", {}).items():
        if "error" in result:
            lines.append(f"| {task} | error | {result['error']} |")
            continue
        if "not_applicable" in result:
            lines.append(f"| {task} | not applicable | {result['not_applicable']} |")
            continue
        for name, value in (result.get("metrics") or {}).items():
            lines.append(f"| {task} | {name} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    json_path = write_json(output_dir / REPORT_JSON, report)
    md_path = output_dir / REPORT_MD
    md_path.write_text(markdown_table(report))
    return json_path, md_path


def read_report(path: str | Path) -> dict[str, Any]:
    """A report file, or a run directory holding eval_report.json."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no eval report (write one with `python run.py mode=eval ...`)")
    report = json.loads(path.read_text())
    if "tasks" not in report:
        raise ValueError(f"{path} is not an eval report (no 'tasks' key)")
    report.setdefault("source", str(path))
    return report
