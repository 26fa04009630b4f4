"""MoSTLitModule: LM loss shift/masking against a hand computation, aux loss handling, loss breakdowns."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader

from conftest import compose_run_config
from most_lightning.lit import MoSTLitModule
from most_lightning.marks import IGNORE_INDEX
from most_lightning.model import MoSTOutput, RouterStats
from most_lightning.model.token_losses import shifted_token_losses

TINY_MODEL = dict(preset="tiny", hidden_size=32, num_heads=2, intermediate_size=64, moe_intermediate_size=16,
                  kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def make_batch(tok) -> dict:
    """One ASR, one TTS and one text-LM sample, right-padded, labels only on the responses (text: all but BOS)."""
    t, u = tok.encode_text, tok.encode_units
    samples = [
        ("asr", [tok.bos_id, *u([1, 2, 3]), tok.eos_id], [tok.bos_id, *t("abc"), tok.eos_id]),
        ("tts", [tok.bos_id, *t("cab"), tok.eos_id], [tok.bos_id, *u([4, 5, 6, 7]), tok.eos_id]),
        ("text", [], [tok.bos_id, *t("hello"), tok.eos_id]),
    ]
    rows, labels = [], []
    for task, prompt, response in samples:
        ids = prompt + response
        lab = [IGNORE_INDEX] * len(prompt) + response
        if task == "text":
            lab[0] = IGNORE_INDEX
        else:
            lab[len(prompt)] = IGNORE_INDEX  # the response's BOS is given, not predicted
        rows.append(ids)
        labels.append(lab)
    width = max(map(len, rows))
    input_ids = torch.full((3, width), tok.pad_id)
    label_t = torch.full((3, width), IGNORE_INDEX)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = True
    return dict(input_ids=input_ids, labels=label_t, modality=tok.modality_of(input_ids), attention_mask=mask,
                task=["asr", "tts", "text"], n_skipped=2)


def hand_nll(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, float]]:
    """(row, position of the target, nll) for every supervised target, written out longhand."""
    out = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            out.append((b, t + 1, float(torch.logsumexp(row, 0) - row[target])))
    return out


class StubModel(torch.nn.Module):
    """Returns fixed logits, their LM loss and fixed router losses, so the LitModule's arithmetic can be checked
    exactly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, modality, attention_mask=None, labels=None, tasks=None, compute_logits=True):
        aux = {"balance": torch.tensor(0.3), "z": torch.tensor(0.2)}
        stats = RouterStats(load=torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]),
                            tokens=torch.tensor([6.0, 4.0]))
        logits = self.logits * self.scale
        losses = shifted_token_losses(logits, labels, modality)
        losses.tasks = tasks
        return MoSTOutput(logits=logits, aux_loss=aux["balance"] + aux["z"], aux_losses=aux, router_stats=[stats],
                          token_losses=losses)


def loader(*batches: dict) -> DataLoader:
    """A DataLoader that yields the given ready-made batches."""
    return DataLoader(list(batches), batch_size=None)


def make_module(vocab_size: int, router: str = "modality_aware", tokenizer=None) -> MoSTLitModule:
    router_cfg = compose_run_config([f"router={router}"]).router  # conf/router/<router>.yaml as run.py composes it
    return MoSTLitModule(model=TINY_MODEL, router=router_cfg, vocab_size=vocab_size, tokenizer=tokenizer)


def capture_logs(module: MoSTLitModule, monkeypatch) -> dict:
    logged: dict = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.update(values))
    return logged


def test_loss_shift_and_masking_match_hand_computation(toy_tokenizer):
    batch = make_batch(toy_tokenizer)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, toy_tokenizer.vocab_size)
    losses = shifted_token_losses(logits, batch["labels"], batch["modality"])
    expected = hand_nll(logits, batch["labels"])
    assert int(losses.n_tokens) == len(expected)
    assert float(losses.mean()) == pytest.approx(sum(n for *_, n in expected) / len(expected), rel=1e-6)

    # logits at positions whose next label is masked (prompt, padding, the last position) must not matter
    changed = logits.clone()
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if t == logits.shape[1] - 1 or batch["labels"][b, t + 1] == IGNORE_INDEX:
                changed[b, t] += 100 * torch.randn(logits.shape[-1])
    assert float(shifted_token_losses(changed, batch["labels"], batch["modality"]).mean()) == pytest.approx(
        float(losses.mean()), rel=1e-6)


def stubbed_training_step(toy_tokenizer, monkeypatch, seed: int):
    """One training step of a module whose model returns fixed random logits; returns what it logged."""
    batch = make_batch(toy_tokenizer)
    torch.manual_seed(seed)
    logits = torch.randn(*batch["input_ids"].shape, toy_tokenizer.vocab_size)
    module = make_module(toy_tokenizer.vocab_size)
    module.model = StubModel(logits)
    logged = capture_logs(module, monkeypatch)
    loss = module.training_step(batch, 0)
    return batch, logits, module, logged, loss


def test_training_step_adds_aux_loss_but_logs_it_separately(toy_tokenizer, monkeypatch):
    batch, logits, module, logged, loss = stubbed_training_step(toy_tokenizer, monkeypatch, seed=0)
    lm = sum(n for *_, n in hand_nll(logits, batch["labels"])) / len(hand_nll(logits, batch["labels"]))
    assert float(loss.detach()) == pytest.approx(lm + 0.5, rel=1e-5)
    assert float(logged["train/loss"]) == pytest.approx(lm, rel=1e-5)  # LM only
    assert float(logged["train/aux_loss"]) == pytest.approx(0.5)
    assert float(logged["train/aux/balance"]) == pytest.approx(0.3)
    assert float(logged["train/aux/z"]) == pytest.approx(0.2)
    assert logged["train/n_skipped"] == 2
    loss.backward()  # the aux loss is part of the optimised objective
    assert module.model.scale.grad is not None


def test_per_modality_and_per_task_losses_recombine_to_the_total(toy_tokenizer, monkeypatch):
    batch, logits, _, logged, _ = stubbed_training_step(toy_tokenizer, monkeypatch, seed=1)

    nll = hand_nll(logits, batch["labels"])
    target_modality = {(b, t): int(batch["modality"][b, t]) for b, t, _ in nll}
    by_modality = {m: [n for b, t, n in nll if target_modality[(b, t)] == m] for m in (0, 1)}
    by_task = {task: [n for b, _, n in nll if batch["task"][b] == task] for task in ("asr", "tts", "text")}
    assert float(logged["train/loss_text"]) == pytest.approx(sum(by_modality[0]) / len(by_modality[0]), rel=1e-5)
    assert float(logged["train/loss_audio"]) == pytest.approx(sum(by_modality[1]) / len(by_modality[1]), rel=1e-5)
    for task, values in by_task.items():
        assert float(logged[f"train/loss_task_{task}"]) == pytest.approx(sum(values) / len(values), rel=1e-5)

    # token-weighted recombination gives back the total LM loss
    total = float(logged["train/loss"])
    n = {m: len(v) for m, v in by_modality.items()}
    recombined = (n[0] * float(logged["train/loss_text"]) + n[1] * float(logged["train/loss_audio"])) / sum(n.values())
    assert recombined == pytest.approx(total, rel=1e-5)
    recombined = sum(len(by_task[t]) * float(logged[f"train/loss_task_{t}"]) for t in by_task) / len(nll)
    assert recombined == pytest.approx(total, rel=1e-5)
    # audio targets: the TTS response's boa + 4 units + eoa (the ASR audio is prompt, not target)
    assert len(by_modality[1]) == 6


def test_tts_unit_metrics_skip_audio_markers(toy_tokenizer):
    batch = make_batch(toy_tokenizer)
    vocab = toy_tokenizer.vocab_size
    # logits that predict every label perfectly except the markers: unit accuracy must be exactly 1
    logits = torch.zeros(*batch["input_ids"].shape, vocab)
    for b in range(3):
        for t in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target not in (IGNORE_INDEX, toy_tokenizer.boa_id, toy_tokenizer.eoa_id):
                logits[b, t, target] = 20.0
    module = make_module(vocab, tokenizer=toy_tokenizer)
    module.model = StubModel(logits)
    module._teacher_forced_update(batch, module.test_metrics, "test")
    assert float(module.test_metrics["tts_unit_acc"].compute()) == 1.0
    assert float(module.test_metrics["tts_unit_acc"].count) == 4  # the four unit tokens of the TTS response
    assert float(module.test_metrics["tts_unit_nll"].compute()) < 1e-6


def test_fit_validate_and_test_with_real_tiny_model(toy_tokenizer, tmp_path):
    """A real tiny MoST through Lightning: 2 steps, validation, test with greedy ASR generation."""
    torch.manual_seed(0)
    batch = make_batch(toy_tokenizer)
    prompt = torch.tensor([[toy_tokenizer.pad_id, toy_tokenizer.bos_id, *toy_tokenizer.encode_units([1, 2])],
                           [toy_tokenizer.bos_id, *toy_tokenizer.encode_units([3, 4, 5])]])
    gen_batch = dict(prompt_ids=prompt, prompt_mask=torch.tensor([[False] + [True] * 5, [True] * 6]),
                     prompt_modality=toy_tokenizer.modality_of(prompt), reference_text=["abc", "de"],
                     key=["u1", "u2"], n_skipped=0)
    module = make_module(toy_tokenizer.vocab_size, tokenizer=toy_tokenizer)
    module.evaluation_settings["asr_max_new_tokens"] = 4
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader(batch, batch), val_dataloaders=loader(batch))
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["val/nll"]))
    assert "val/expert_load/audio_to_audio_group" in metrics
    assert float(metrics["val/expert_load/audio_to_audio_group"]) == pytest.approx(1.0)  # modality-aware

    # a mismatched-audio batch says so itself (the datamodule's mismatched loader flags it)
    trainer.test(module, dataloaders=[loader(batch), loader(gen_batch), loader(gen_batch | {"mismatched": True})])
    metrics = trainer.callback_metrics
    for key in ("test/asr_wer", "test/asr_cer", "test/tts_unit_nll", "test/tts_unit_acc", "test/text_nll",
                "test/expert_load/load_max_over_mean_audio", "test/asr_mismatched_wer"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert float(metrics["test/asr_n_utterances"]) == float(metrics["test/asr_mismatched_n_utterances"]) == 2
    assert len(module.asr_examples["asr"]) == len(module.asr_examples["asr_mismatched"]) == 2


def test_the_tokenizer_comes_from_the_constructor_only(toy_tokenizer):
    """No datamodule fallback: a module built without its tokenizer refuses TTS unit metrics (which need the
    begin/end-of-audio markers) instead of silently counting the markers as units."""
    batch = make_batch(toy_tokenizer)
    module = make_module(toy_tokenizer.vocab_size)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=toy_tokenizer))
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"MoSTLitModule\(\.\.\., tokenizer="):
        module._teacher_forced_update(batch, module.val_metrics, "val")
    text_only = {**{k: v[2:] for k, v in batch.items() if k != "n_skipped"}, "n_skipped": 0}
    with torch.no_grad():  # no TTS row: nothing needs the tokenizer
        module._teacher_forced_update(text_only, module.val_metrics, "val")
    assert float(module.val_metrics["nll_task_text"].count) > 0
