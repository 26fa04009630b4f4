"""Compare eval reports: one Markdown/JSON table (rows = runs, columns = metrics) and one bar plot per metric,
with the published MoST numbers (docs/model_spec.md section 6) as a reference row where a metric matches.

    python -m most_lightning.eval.compare logs/eval/runs/A logs/eval/runs/B --labels vanilla modality_aware \\
        --out comparison/
    python -m most_lightning.eval.compare logs/eval/multiruns/<time>/*    # a multirun's job directories

The reference values come from full-scale training on LibriSpeech etc.; a demo-sized model is not expected to
reach them: the row shows where the bar is, on the same scale (WER as a fraction, accuracy in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from most_lightning.eval.report import flat_metrics, read_report

# (metric-name pattern, published value, what it is). WER as a fraction, accuracies in [0, 1].
MOST_REFERENCE: list[tuple[str, float, str]] = [
    (r"^asr/wer_(greedy|beam)$", 0.020, "ASR WER, LibriSpeech test-clean"),
    (r"^tts/wer_(?!ground_truth$|resynth_).+$", 0.060, "TTS WER, LibriSpeech test-clean (HuBERT-large CTC judge)"),
    (r"^minimal_pairs/swuggy_acc_(sum|mean)$", 0.7528, "sWUGGY accuracy"),
    (r"^minimal_pairs/sblimp_acc_(sum|mean)$", 0.6342, "sBLIMP accuracy"),
    (r"^minimal_pairs/topic_storycloze_acc_(sum|mean)$", 0.8364, "sTopic-StoryCloze accuracy"),
    (r"^minimal_pairs/storycloze_acc_(sum|mean)$", 0.6543, "sStoryCloze accuracy"),
    (r"^spoken_qa/llama_questions_s2t_exact$", 0.748, "Llama Questions S->T exact match"),
    (r"^spoken_qa/llama_questions_s2s_exact$", 0.626, "Llama Questions S->S exact match"),
    (r"^spoken_qa/triviaqa_s2t_exact$", 0.435, "TriviaQA S->T exact match"),
    (r"^spoken_qa/triviaqa_s2s_exact$", 0.321, "TriviaQA S->S exact match"),
    (r"^spoken_qa/webquestions_s2t_exact$", 0.582, "WebQuestions S->T exact match"),
    (r"^spoken_qa/webquestions_s2s_exact$", 0.447, "WebQuestions S->S exact match"),
]
# counts and bookkeeping are not worth a plot
_NOT_PLOTTED = re.compile(r"(^|/)(n_|seconds)|_n_|n_tokens|n_sentences")


def reference_value(metric: str) -> tuple[float, str] | None:
    for pattern, value, what in MOST_REFERENCE:
        if re.match(pattern, metric):
            return value, what
    return None


def default_label(report: dict[str, Any]) -> str:
    source = Path(report.get("source", "?"))
    return f"{report.get('router', '?')} ({source.parent.name})"


def comparison_table(reports: Sequence[dict[str, Any]], labels: Sequence[str] | None = None,
                     metrics: Sequence[str] | None = None) -> dict[str, Any]:
    labels = list(labels) if labels else [default_label(r) for r in reports]
    if len(labels) != len(reports):
        raise ValueError(f"{len(labels)} labels for {len(reports)} reports")
    flats = [flat_metrics(r) for r in reports]
    names = list(metrics) if metrics else sorted({k for f in flats for k in f if not _NOT_PLOTTED.search(k)})
    rows = [{"label": label, "values": {m: f.get(m) for m in names}} for label, f in zip(labels, flats)]
    reference = {m: reference_value(m) for m in names}
    return {"metrics": names, "rows": rows,
            "reference": {m: {"value": r[0], "what": r[1]} for m, r in reference.items() if r}}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def markdown(table: dict[str, Any]) -> str:
    names = table["metrics"]
    lines = ["| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in table["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row["values"][m]) for m in names) + " |")
    if table["reference"]:
        ref = table["reference"]
        lines.append("| MoST (published, full scale) | "
                     + " | ".join(_cell(ref[m]["value"]) if m in ref else "–" for m in names) + " |")
        lines += ["", "Reference values (docs/model_spec.md section 6): "
                  + "; ".join(f"`{m}` = {v['what']}" for m, v in ref.items())]
    return "\n".join(lines) + "\n"


def bar_plots(table: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = [r["label"] for r in table["rows"]]
    for metric in table["metrics"]:
        values = [r["values"][metric] for r in table["rows"]]
        if all(v is None for v in values):
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels) + 1.5), 3.6))
        ax.bar(range(len(labels)), [v if v is not None else 0.0 for v in values], color="tab:blue")
        for i, v in enumerate(values):
            ax.text(i, v or 0.0, _cell(v), ha="center", va="bottom", fontsize=8)
        ref = table["reference"].get(metric)
        if ref:
            ax.axhline(ref["value"], color="tab:red", linestyle="--", label=f"MoST published: {ref['value']:.4g}")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^\w.-]+", "_", metric) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(report_paths: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None,
            metrics: Sequence[str] | None = None) -> dict[str, Any]:
    reports = [read_report(p) for p in report_paths]
    if not reports:
        raise ValueError("give at least one eval report (a run directory or an eval_report.json)")
    table = comparison_table(reports, labels, metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(markdown(table))
    (out / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
    table["plots"] = [str(p) for p in bar_plots(table, out)]
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="eval run directories or eval_report.json files")
    parser.add_argument("--labels", nargs="+", help="one row label per report (default: router + run dir)")
    parser.add_argument("--metrics", nargs="+", help="only these metrics, e.g. asr/wer_greedy (default: all)")
    parser.add_argument("--out", default="comparison", help="output directory (table + one PNG per metric)")
    args = parser.parse_args(argv)
    table = compare(args.reports, args.out, args.labels, args.metrics)
    print(markdown(table))
    print(f"written: {Path(args.out) / 'comparison.md'}, {Path(args.out) / 'comparison.json'}, "
          f"{len(table['plots'])} plot(s)")


if __name__ == "__main__":
    main()
