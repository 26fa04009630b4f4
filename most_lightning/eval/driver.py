"""`python run.py mode=eval ckpt_path=... eval=<suite>`: run a checkpoint through a suite of eval tasks.

A suite (conf/eval/*.yaml) lists tasks by name with their settings; a task set to null is skipped. Every task
returns {"metrics": {...}, ...}; a task that fails is recorded with its error (and the suite goes on) unless
eval.fail_fast is set. Writes eval_report.json and eval_report.md into the run directory.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from most_lightning.model.router import router_config

log = logging.getLogger("most_lightning.eval")


def _task_registry() -> dict[str, Callable[..., dict]]:
    from most_lightning.eval.asr import evaluate_asr
    from most_lightning.eval.text_lm import evaluate_text_perplexity

    registry: dict[str, Callable[..., dict]] = {"asr": evaluate_asr, "text_ppl": evaluate_text_perplexity}
    try:  # optional tasks register themselves here when their modules exist
        from most_lightning.eval.tts import evaluate_tts

        registry["tts"] = evaluate_tts
    except ImportError:
        pass
    try:
        from most_lightning.eval.minimal_pairs import evaluate_minimal_pairs

        registry["minimal_pairs"] = evaluate_minimal_pairs
    except ImportError:
        pass
    try:
        from most_lightning.eval.spoken_qa import evaluate_spoken_qa

        registry["spoken_qa"] = evaluate_spoken_qa
    except ImportError:
        pass
    try:
        from most_lightning.eval.lm_harness import evaluate_lm_harness

        registry["lm_eval"] = evaluate_lm_harness
    except ImportError:
        pass
    return registry


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def with_settings_of_checkpoint(cfg: DictConfig) -> tuple[DictConfig, Any]:
    """(run config, checkpoint contents): a Lightning checkpoint's model, router, audio and data settings replace
    the composed groups, with the command line's overrides applied again on top (most_lightning.lit.checkpoint);
    exported weights carry no settings, so the composed config stays."""
    from most_lightning.eval.checkpoint import is_lightning_checkpoint, read_eval_checkpoint
    from most_lightning.lit.checkpoint import (check_lit_checkpoint, command_line_overrides, saved_settings,
                                               with_checkpoint_settings)

    path, ckpt = read_eval_checkpoint(cfg.get("ckpt_path"))
    if is_lightning_checkpoint(ckpt):
        check_lit_checkpoint(ckpt, path)
        settings = saved_settings(ckpt)
        if "data" not in settings:
            log.warning(f"{path} records no data settings (written before checkpoints did): evaluating on the data "
                        "config of this command line")
        cfg = with_checkpoint_settings(cfg, settings, command_line_overrides(cfg))
    return cfg, ckpt


def build_context(cfg: DictConfig, ckpt: Any = None):
    """The eval context: the data config's datamodule and tokenizer, and the checkpoint's model on the device
    (``ckpt``: the contents of cfg.ckpt_path when already read)."""
    import hydra

    from most_lightning.eval.checkpoint import load_for_eval
    from most_lightning.eval.context import EvalContext
    from most_lightning.metrics.normalize import TextNormalizer

    suite = cfg.eval
    audio = cfg.get("audio")  # the same speech front end for the test prompts and the model (as in run.py)
    datamodule = hydra.utils.instantiate(cfg.data, audio=audio)
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer
    model, audio_input, info = load_for_eval(cfg.get("ckpt_path"), cfg.model, cfg.router, tokenizer.vocab_size,
                                             _plain(audio), ckpt=ckpt)
    device = torch.device(suite.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if audio_input is not None:
        audio_input.to(device)
    ctx = EvalContext(model=model, tokenizer=tokenizer, datamodule=datamodule,
                      normalizer=TextNormalizer.from_any(_plain(suite.get("normalizer"))),
                      batch_size=int(suite.get("batch_size", 8)), device=device,
                      output_dir=Path(cfg.paths.output_dir), progress=bool(suite.get("progress", True)),
                      audio_input=audio_input)
    return ctx, info


# tasks that feed speech to the model as unit tokens (audio -> the corpus' unit extractor -> prompt); a MoST-C
# model reads speech as continuous features, so they are reported as not applicable to it, never run
UNIT_INPUT_TASKS = {"minimal_pairs": "scores speech as unit tokens",
                    "spoken_qa": "feeds spoken questions as unit tokens"}


def not_applicable(name: str, ctx) -> str | None:
    if ctx.continuous and name in UNIT_INPUT_TASKS:
        return (f"the model reads speech as continuous features (audio=continuous) and this task "
                f"{UNIT_INPUT_TASKS[name]}")
    return None


def check_task_settings(name: str, task: Callable[..., dict], settings: Mapping[str, Any],
                        unset: Iterable[str] = ()) -> None:
    """A task's settings are exactly its function's keyword-only parameters, all given (conf/eval/tasks/<task>.yaml
    writes each one, the function defaults none); `unset`: dotted keys left at ??? in the suite. Raises a
    ValueError naming the task and the settings."""
    params = inspect.signature(task).parameters.values()
    known = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    required = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty}
    unknown, missing = sorted(set(settings) - known), sorted(required - set(settings))
    if unknown:
        raise ValueError(f"eval.tasks.{name} has unknown setting(s) {unknown}; known: {sorted(known)}")
    if missing:
        raise ValueError(f"eval.tasks.{name} lacks setting(s) {missing}; conf/eval/tasks/{name}.yaml holds them "
                         f"all: include it in the suite's defaults as tasks/{name}@tasks.{name}")
    if unset:
        raise ValueError(f"eval.tasks.{name} needs a value for {sorted(f'eval.tasks.{name}.{k}' for k in unset)} "
                         "(??? in its yaml), e.g. on the command line")


def suite_tasks(suite: DictConfig, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{task: settings} of the suite's enabled tasks (a task set to null or enabled: false is skipped); `only`
    picks some of them by name. Unknown names, and settings that do not fit the task, are refused."""
    registry = _task_registry()
    tasks = {k: v for k, v in _plain(suite.tasks).items() if v is not None and v.get("enabled", True) is not False}
    unknown = sorted(set(tasks) - set(registry))
    if unknown:
        raise ValueError(f"eval.tasks has unknown task(s) {unknown}; known: {sorted(registry)}")
    if only is not None:
        missing = sorted(set(only) - set(tasks))
        if missing:
            raise ValueError(f"eval task(s) {missing} are not enabled in the eval suite {suite.get('name', '?')!r} "
                             f"(enabled: {sorted(tasks)}); pick its suite with eval=<file of conf/eval>")
        tasks = {k: v for k, v in tasks.items() if k in only}
    tasks = {name: {k: v for k, v in settings.items() if k != "enabled"} for name, settings in tasks.items()}
    for name, settings in tasks.items():
        unset = {key.split(f"tasks.{name}.", 1)[-1] for key in OmegaConf.missing_keys(suite.tasks[name])}  # full paths
        check_task_settings(name, registry[name], settings, unset)
    return tasks


def run_tasks(ctx, tasks: dict[str, dict[str, Any]], fail_fast: bool) -> dict[str, dict[str, Any]]:
    """Run each task on the context; {task: result}. A failing task is recorded with its error (the others go
    on) unless fail_fast."""
    registry = _task_registry()
    results: dict[str, dict[str, Any]] = {}
    for name, settings in tasks.items():
        log.info(f"eval task {name} {settings}")
        start = time.perf_counter()
        reason = not_applicable(name, ctx)
        try:
            if reason is not None:
                log.warning(f"eval task {name}: not applicable: {reason}")
                result = {"metrics": {}, "not_applicable": reason}
            else:
                result = registry[name](ctx, **settings)
        except Exception as err:  # noqa: BLE001  one failing task must not lose the others' results
            if fail_fast:
                raise
            log.exception(f"eval task {name} failed")
            result = {"error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = result
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in (result.get("metrics") or {}).items())
        log.info(f"{name}: {shown or result.get('error') or 'not applicable'}")
    return results


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    from most_lightning.eval.report import flat_metrics, write_report

    if cfg.get("eval") is None:
        raise ValueError("mode=eval needs a suite: eval=<name of a file in conf/eval> (e.g. eval=asr, eval=full)")
    suite = cfg.eval
    tasks = suite_tasks(suite)
    cfg, ckpt = with_settings_of_checkpoint(cfg)
    from most_lightning.data.settings_check import check_data_config

    check_data_config(cfg.data)
    if cfg.get("seed") is not None:
        torch.manual_seed(int(cfg.seed))
    ctx, info = build_context(cfg, ckpt)
    report = report_head(cfg, ctx, info)
    report["tasks"] = run_tasks(ctx, tasks, bool(suite.get("fail_fast", False)))
    json_path, md_path = write_report(report, ctx.output_dir)
    log.info(f"eval report written to {json_path} and {md_path}")
    return flat_metrics(report)


def report_head(cfg: DictConfig, ctx, info: dict[str, Any]) -> dict[str, Any]:
    return {"suite": cfg.eval.get("name", "?"), "checkpoint": info, "router": router_config(cfg.router).name,
            "model": _plain(cfg.model), "audio": _plain(cfg.get("audio")), "vocab_size": ctx.tokenizer.vocab_size,
            "normalizer": _plain(cfg.eval.get("normalizer")), "tasks": {}}


def evaluate_after_test(cfg: DictConfig, module: Any, datamodule: Any, checkpoint: str | None) -> dict[str, float]:
    """run.py's `eval_after_test: [task, ...]`: those tasks of the eval suite on the weights just tested (the
    LitModule in memory), after the test stage; writes eval_report.json/.md into the run directory and returns
    {"eval/<task>/<metric>": value}."""
    from most_lightning.eval.context import EvalContext
    from most_lightning.eval.report import run_metrics, write_report
    from most_lightning.metrics.normalize import TextNormalizer

    suite = cfg.eval
    tasks = suite_tasks(suite, list(cfg.eval_after_test))
    model = module.model
    ctx = EvalContext(model=model, tokenizer=datamodule.tokenizer, datamodule=datamodule,
                      normalizer=TextNormalizer.from_any(_plain(suite.get("normalizer"))),
                      batch_size=int(suite.get("batch_size", 8)), device=next(model.parameters()).device,
                      output_dir=Path(cfg.paths.output_dir), progress=bool(suite.get("progress", True)),
                      audio_input=module.audio_input)
    was_training = model.training
    model.eval()
    try:
        report = report_head(cfg, ctx, {"path": checkpoint or "weights in memory"})
        report["tasks"] = run_tasks(ctx, tasks, bool(suite.get("fail_fast", False)))
    finally:
        model.train(was_training)
    write_report(report, ctx.output_dir)
    return run_metrics(report)
