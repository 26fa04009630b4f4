"""EleutherAI lm-evaluation-harness (0.4.x) adapter: MMLU, GSM8K, ... run on a MoST checkpoint when their data
are present locally (nothing is downloaded here; a task whose data are missing fails in the harness).

    from most_lightning.eval.lm_harness import MoSTHarnessLM
    lm = MoSTHarnessLM(model, tokenizer)
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path=dir))

Text is scored as BOS + text (the text-LM format the model was trained on); contexts longer than max_length
keep their last tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lm_eval.api.model import LM

from most_lightning.data.collate import collate_asr_generation
from most_lightning.data.tasks import GenerationExample
from most_lightning.model.generation import greedy_generate


class MoSTHarnessLM(LM):
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 device: str | torch.device = "cpu", max_gen_toks: int = 64):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size_, self.device_ = int(batch_size), torch.device(device)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = max_gen_toks

    # ------------------------------------------------------------------ scoring
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness' HF model: trailing spaces of the context move to the continuation, and the
        continuation's ids are what the whole string adds after the context's."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok.encode_text(context + continuation)
        ctx_ids = self.tok.encode_text(context)
        return [self.tok.bos_id] + ctx_ids, whole[len(ctx_ids):]

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per (context ids, cont ids)."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size_):
            chunk = pairs[start : start + self.batch_size_]
            seqs = [(c + k)[-(self.max_length + 1):][:-1] for c, k in chunk]  # inputs; last token only a target
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for r, s in enumerate(seqs):
                ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), True
            ids, mask = ids.to(self.device_), mask.to(self.device_)
            logp = torch.log_softmax(self.model(ids, self.tok.modality_of(ids) * mask,
                                                attention_mask=mask).logits.float(), -1)
            for r, ((c, k), s) in enumerate(zip(chunk, seqs)):
                n = len(k)
                rows = logp[r, len(s) - n : len(s)]  # predictions of the continuation tokens
                target = torch.tensor(k, device=self.device_)
                out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole string (every token after BOS), in windows of max_length tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for r in requests:
            windows = get_rolling_token_windows(token_list=self.tok.encode_text(r.args[0]),
                                                prefix_token=self.tok.bos_id, max_seq_len=self.max_length,
                                                context_len=1)
            pairs = [make_disjoint_window(w) for w in windows]
            results.append(sum(ll for ll, _ in self._score([(list(c), list(k)) for c, k in pairs])))
        return results

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = ([self.tok.bos_id] + self.tok.encode_text(context))[-(self.max_length - max_new):]
            batch = collate_asr_generation([GenerationExample(prompt, "", "")], self.tok.pad_id, self.tok.modality_of)
            new = greedy_generate(self.model, batch["prompt_ids"].to(self.device_),
                                  batch["prompt_modality"].to(self.device_), batch["prompt_mask"].to(self.device_),
                                  max_new, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                                  modality_of=self.tok.modality_of)[0].tolist()
            if self.tok.eos_id in new:
                new = new[: new.index(self.tok.eos_id)]
            text = self.tok.decode_text(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def evaluate_lm_harness(ctx, *, tasks: Sequence[str], include_path: str | None, limit: int | None,
                        num_fewshot: int | None, max_gen_toks: int) -> dict[str, Any]:
    """Run harness tasks (names, or task yaml files under include_path) and flatten their metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("lm_eval.tasks is empty: name harness tasks (e.g. [mmlu]) or local task yamls")
    lm = MoSTHarnessLM(ctx.model, ctx.tokenizer, ctx.batch_size, device=ctx.device, max_gen_toks=max_gen_toks)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    metrics: dict[str, Any] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{key.replace(',none', '')}"] = float(value)
    return {"metrics": metrics, "settings": {"tasks": list(tasks), "include_path": include_path, "limit": limit,
                                             "num_fewshot": num_fewshot}}
