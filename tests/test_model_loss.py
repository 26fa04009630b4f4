"""The model owns its loss: MoSTForCausalLM(labels=...) returns the LM loss (total, by target modality, by task)
and the router losses; each LM figure equals F.cross_entropy written out over the logits at the supervised
positions, on the logits path and on the fused chunked path alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from most_lightning.marks import IGNORE_INDEX, MODALITY_NAMES
from most_lightning.model import MoSTConfig, MoSTForCausalLM

VOCAB = 61
TASKS = ["asr", "tts", "text", "tts"]


def tiny_model(router: str = "modality_aware") -> MoSTForCausalLM:
    torch.manual_seed(0)
    config = MoSTConfig.from_preset("tiny", vocab_size=VOCAB, hidden_size=32, num_heads=2, kv_lora_rank=8,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, intermediate_size=48,
                                    moe_intermediate_size=16, router={"name": router})
    return MoSTForCausalLM(config)


def batch_with_prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    modality = torch.randint(0, 2, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompts
    labels[1, 9:] = IGNORE_INDEX  # padding
    labels[2, 6] = IGNORE_INDEX
    return ids, modality, labels


def reference_means(logits: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor, tasks: list[str]):
    """(total, {modality name: mean}, {task: mean}): F.cross_entropy of logits[b, t] against labels[b, t + 1],
    selected position by position."""
    rows = []  # (nll, target modality, task)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                nll = F.cross_entropy(logits[b, t].double()[None], torch.tensor([target]))
                rows.append((float(nll), int(modality[b, t + 1]), tasks[b]))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    by_modality = {name: mean([n for n, m, _ in rows if m == mark]) for mark, name in enumerate(MODALITY_NAMES)
                   if any(m == mark for _, m, _ in rows)}
    by_task = {task: mean([n for n, _, k in rows if k == task]) for task in sorted(set(tasks))}
    return mean([n for n, *_ in rows]), by_modality, by_task


@pytest.mark.parametrize("compute_logits", [True, False], ids=["logits", "fused"])
def test_model_loss_parts_equal_cross_entropy_over_supervised_positions(compute_logits):
    model = tiny_model()
    ids, modality, labels = batch_with_prompts()
    with torch.no_grad():
        logits = model(ids, modality).logits
        out = model(ids, modality, labels=labels, tasks=TASKS, compute_logits=compute_logits)
    total, by_modality, by_task = reference_means(logits, labels, modality, TASKS)
    assert (out.logits is not None) == compute_logits
    assert float(out.lm_loss) == pytest.approx(total, rel=1e-5)
    got = out.lm_loss_by_modality()
    assert got.keys() == by_modality.keys() == {"text", "audio"}
    for name, value in by_modality.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-5), name
    got = out.lm_loss_by_task()
    assert got.keys() == by_task.keys()
    for task, value in by_task.items():
        assert float(got[task]) == pytest.approx(value, rel=1e-5), task
    # the router losses come with it, and loss is the optimised sum
    assert set(out.aux_losses) and float(out.aux_loss) == pytest.approx(float(sum(out.aux_losses.values())))
    assert float(out.loss) == pytest.approx(float(out.lm_loss + out.aux_loss))


def test_fused_and_logits_paths_give_the_same_loss_and_gradients():
    ids, modality, labels = batch_with_prompts()
    results = []
    for fused in (False, True):
        model = tiny_model()
        model.fused_loss = fused
        out = model(ids, modality, labels=labels, compute_logits=False)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and "lm_head.weight" in fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_modality_without_targets_is_left_out_and_an_unsupervised_task_is_zero():
    model = tiny_model("vanilla")
    ids, _, labels = batch_with_prompts()
    labels[3] = IGNORE_INDEX  # the second tts row supervises nothing; row 1 still does
    labels[0] = IGNORE_INDEX  # asr: nothing supervised
    with torch.no_grad():
        out = model(ids, torch.zeros_like(ids), labels=labels, tasks=TASKS, compute_logits=False)
    assert set(out.lm_loss_by_modality()) == {"text"}
    assert float(out.lm_loss_by_task()["asr"]) == 0.0


def test_loss_inputs_that_do_not_fit_fail_clearly():
    model = tiny_model()
    ids, modality, labels = batch_with_prompts()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"labels \(4, 11\) must match input_ids \(4, 12\)"):
            model(ids, modality, labels=labels[:, :-1])
        with pytest.raises(ValueError, match="tasks names 3 rows but the batch has 4"):
            model(ids, modality, labels=labels, tasks=TASKS[:3])
        out = model(ids, modality, labels=labels)
        with pytest.raises(ValueError, match="pass tasks="):
            out.lm_loss_by_task()
        with pytest.raises(ValueError, match="call the model with labels="):
            _ = model(ids, modality).lm_loss
