"""MoST-C continuous audio input: frame-slot layout, labels, masks, the splice, and the three reference defects
(docs/model_spec.md section 3) -- inverted HuBERT padding mask, labels not re-aligned after the splice, encoder weights
overwritten by re-initialisation -- each with a test that would fail if it were reproduced."""

from __future__ import annotations

import pytest
import torch

from most_lightning.audio.hubert import HubertArch, HubertEncoder
from most_lightning.audio.hubert_checkpoints import save_torchaudio_checkpoint
from most_lightning.data.collate import collate_asr_generation, collate_teacher_forced
from most_lightning.audio.frontend import AudioFrontendConfig, build_continuous_encoder, frame_counter
from most_lightning.data.continuous import ContinuousASRFormatter
from most_lightning.data.tasks import IGNORE_INDEX, TaskFormatter
from most_lightning.lit import MoSTLitModule
from most_lightning.model.token_losses import shifted_token_losses
from most_lightning.model.audio_input import ContinuousAudioInput

TINY_MODEL = dict(preset="tiny", hidden_size=32, num_heads=2, intermediate_size=64, moe_intermediate_size=16,
                  kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
LAYER_NORM_ARCH = HubertArch(conv_layers=((16, 10, 5), (16, 8, 4), (16, 4, 4), (16, 2, 2), (16, 2, 2), (16, 2, 2)),
                             extractor_mode="layer_norm", conv_bias=True, embed_dim=32, num_layers=2, num_heads=4,
                             ff_dim=64, pos_conv_kernel=8, pos_conv_groups=4, layer_norm_first=True)


def waves(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


def continuous_examples(tok, markers="drop", enc=None):
    enc = enc or HubertEncoder.random("tiny")
    fmt = ContinuousASRFormatter(TaskFormatter(tok), enc.n_frames, markers)
    texts = ["abc", "hello"]
    ws = waves(16000, 9000)
    return enc, fmt, [fmt.asr(w, t, f"utt{i}") for i, (w, t) in enumerate(zip(ws, texts))], ws, texts


# ---------------------------------------------------------------------------------------------- layout / labels
@pytest.mark.parametrize("markers", ["drop", "keep"])
def test_frame_slots_labels_and_masks_are_laid_out_before_the_splice(toy_tokenizer, markers):
    """Defect 2 of the reference: labels built for the unspliced sequence. Here every label sits on the token
    it names: response labels == input ids at the same position, frame slots -100 and marked audio."""
    tok = toy_tokenizer
    enc, fmt, examples, ws, texts = continuous_examples(tok, markers)
    batch = collate_teacher_forced(examples, tok.pad_id, tok.modality_of)
    head = TaskFormatter(tok)._asr_head
    tail = TaskFormatter(tok)._tail
    for row, (w, text) in enumerate(zip(ws, texts)):
        n = enc.n_frames(w.numel())
        assert n == enc(w).shape[0] == int(batch["audio_mask"][row].sum())  # one slot per encoder frame
        start = len(head) + (markers == "keep")
        slots = batch["audio_mask"][row].nonzero().squeeze(1)
        assert slots.tolist() == list(range(start, start + n))
        assert (batch["labels"][row, slots] == IGNORE_INDEX).all()
        assert (batch["modality"][row, slots] == 1).all() and batch["attention_mask"][row, slots].all()
        if markers == "keep":
            assert batch["input_ids"][row, start - 1] == tok.boa_id and batch["input_ids"][row, start + n] == tok.eoa_id
        else:
            assert tok.boa_id not in batch["input_ids"][row].tolist()
        # the response: right after the constant tail, labels equal to the input ids at the same positions
        response = [tok.bos_id] + tok.encode_text(text) + [tok.eos_id]
        r0 = start + n + (markers == "keep") + len(tail)
        assert batch["input_ids"][row, r0 : r0 + len(response)].tolist() == response
        assert batch["labels"][row, r0 : r0 + len(response)].tolist() == response
        supervised = (batch["labels"][row] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert supervised == list(range(r0, r0 + len(response)))
    # the loss's targets (labels shifted by one) are exactly the transcripts' tokens
    logits = torch.zeros(*batch["input_ids"].shape, tok.vocab_size)
    losses = shifted_token_losses(logits, batch["labels"], batch["modality"])
    targets = [losses.target_ids[r][losses.valid[r]].tolist() for r in range(2)]
    assert targets == [[tok.bos_id] + tok.encode_text(t) + [tok.eos_id] for t in texts]


def test_generation_prompts_are_left_padded_with_their_slots(toy_tokenizer):
    tok = toy_tokenizer
    enc = HubertEncoder.random("tiny")
    fmt = ContinuousASRFormatter(TaskFormatter(tok), enc.n_frames, "drop")
    ws = waves(16000, 6000)
    batch = collate_asr_generation([fmt.asr_generation(w, "abc", f"k{i}") for i, w in enumerate(ws)], tok.pad_id,
                                   tok.modality_of)
    width = batch["prompt_ids"].shape[1]
    tail = len(TaskFormatter(tok)._tail)
    for row, w in enumerate(ws):
        n = enc.n_frames(w.numel())
        slots = batch["audio_mask"][row].nonzero().squeeze(1).tolist()
        assert slots == list(range(width - tail - n, width - tail))  # frames end where the constant tail begins
        assert batch["prompt_modality"][row, slots].eq(1).all() and batch["prompt_mask"][row, slots].all()
        assert batch["audio_wave_lengths"][row] == w.numel()


def test_overlong_continuous_example_is_dropped_not_truncated(toy_tokenizer):
    from most_lightning.data.samples import OverlongSampleError

    enc = HubertEncoder.random("tiny")
    fmt = ContinuousASRFormatter(TaskFormatter(toy_tokenizer, max_length=20, max_length_policy="truncate"),
                                 enc.n_frames)
    with pytest.raises(OverlongSampleError, match="audio frames"):
        fmt.asr(waves(16000)[0], "abc", "long")


# ---------------------------------------------------------------------------------------------- the splice
@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
@pytest.mark.parametrize("arch", ["tiny", "layer_norm"])
def test_splice_uses_each_utterance_alone_and_ignores_padding(toy_tokenizer, arch):
    """Defect 1 of the reference: HuBERT got an inverted padding mask. Here the spliced frames of each row equal
    proj(encoder(that waveform alone)), and garbage in the padded part of the waveform batch changes nothing."""
    tok = toy_tokenizer
    enc = HubertEncoder.random("tiny" if arch == "tiny" else LAYER_NORM_ARCH, layer="last", seed=1)
    _, _, examples, ws, _ = continuous_examples(tok, enc=enc)
    batch = collate_teacher_forced(examples, tok.pad_id, tok.modality_of)
    audio_input = ContinuousAudioInput(enc, hidden_size=24)
    embed = torch.nn.Embedding(tok.vocab_size, 24)
    tokens = embed(batch["input_ids"])
    spliced = audio_input.splice(tokens, batch["audio_mask"], batch["audio_waves"], batch["audio_wave_lengths"])
    for row, w in enumerate(ws):
        slots = batch["audio_mask"][row]
        torch.testing.assert_close(spliced[row, slots], audio_input.proj(enc(w)), atol=1e-5, rtol=1e-4)
        assert torch.equal(spliced[row, ~slots], tokens[row, ~slots])  # text positions untouched
    noisy = batch["audio_waves"].clone()
    short = int(batch["audio_wave_lengths"][1])
    noisy[1, short:] = 5 * torch.randn(noisy.shape[1] - short)
    again = audio_input.splice(tokens, batch["audio_mask"], noisy, batch["audio_wave_lengths"])
    assert torch.equal(again, spliced)
    # gradients reach the projection, not the frozen encoder
    again.sum().backward()
    assert audio_input.proj.weight.grad is not None and all(p.grad is None for p in enc.parameters())


def test_splice_refuses_slots_that_do_not_match_the_encoder(toy_tokenizer):
    tok = toy_tokenizer
    _, _, examples, _, _ = continuous_examples(tok, enc=HubertEncoder.random("tiny"))
    batch = collate_teacher_forced(examples, tok.pad_id, tok.modality_of)
    other = HubertEncoder.random(HubertArch(conv_layers=((16, 10, 5), (16, 4, 4), (16, 4, 4)), embed_dim=32,
                                            num_layers=1, num_heads=4, ff_dim=32, pos_conv_kernel=8,
                                            pos_conv_groups=4))  # 200 Hz: other frame counts
    audio_input = ContinuousAudioInput(other, hidden_size=8)
    with pytest.raises(ValueError, match=r"do not match the encoder's frame counts.*\['utt0', 'utt1'\]"):
        audio_input.splice(torch.zeros(*batch["input_ids"].shape, 8), batch["audio_mask"], batch["audio_waves"],
                           batch["audio_wave_lengths"], batch["key"])


# ---------------------------------------------------------------------------------------------- the module
def continuous_module(tmp_path, vocab_size, tokenizer=None):
    source = HubertEncoder.random("tiny", seed=7)
    path = tmp_path / "hubert.safetensors"
    save_torchaudio_checkpoint(source.model, source.arch, path)
    audio = {"mode": "continuous", "encoder": {"kind": "hubert", "checkpoint": str(path), "layer": "last"}}
    router = {"name": "modality_aware"}
    module = MoSTLitModule(model=TINY_MODEL, router=router, vocab_size=vocab_size, audio=audio,
                           scheduler={"total_steps": 10, "warmup_steps": 0}, tokenizer=tokenizer)
    return module, {k: v.clone() for k, v in source.model.state_dict().items()}


def assert_encoder_equals(module, reference):
    own = module.audio_input.encoder.model.state_dict()
    assert own.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(own[k], v), k


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_loaded_encoder_survives_reinitialisation_and_training(tmp_path, toy_tokenizer):
    """Defect 3 of the reference: re-initialisation could overwrite the loaded HuBERT. Here the encoder sits
    outside the decoder: constructing the module, re-initialising the decoder and training steps leave the
    checkpoint's weights untouched, while the projection learns."""
    tok = toy_tokenizer
    module, reference = continuous_module(tmp_path, tok.vocab_size)
    assert_encoder_equals(module, reference)
    module.model.reset_parameters()
    assert_encoder_equals(module, reference)

    module.trainer = None
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    groups = module.configure_optimizers()["optimizer"].param_groups
    optimised = {id(p) for g in groups for p in g["params"]}
    assert id(module.audio_input.proj.weight) in optimised
    assert not any(id(p) in optimised for p in module.audio_input.encoder.parameters())

    enc = module.audio_input.encoder
    _, _, examples, _, _ = continuous_examples(tok, enc=enc)
    batch = collate_teacher_forced(examples, tok.pad_id, tok.modality_of)
    proj_before = module.audio_input.proj.weight.detach().clone()
    module.train()
    for _ in range(2):
        out = module(batch)
        loss = shifted_token_losses(out.logits, batch["labels"], batch["modality"]).mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not module.audio_input.encoder.training
    assert_encoder_equals(module, reference)
    assert not torch.equal(module.audio_input.proj.weight, proj_before)


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_fused_training_loss_sees_the_spliced_frames(tmp_path, toy_tokenizer, monkeypatch):
    """The training step's fused LM-head loss runs on the spliced embeddings: same loss and projection gradient as
    full logits + cross entropy on `module(batch)`."""
    tok = toy_tokenizer
    module, _ = continuous_module(tmp_path, tok.vocab_size)
    monkeypatch.setattr(module, "log", lambda *a, **kw: None)
    monkeypatch.setattr(module, "log_dict", lambda *a, **kw: None)
    monkeypatch.setattr(module, "_track_expert_load", lambda stats: None)
    _, _, examples, _, _ = continuous_examples(tok, enc=module.audio_input.encoder)
    batch = collate_teacher_forced(examples, tok.pad_id, tok.modality_of)
    results = []
    for fused in (False, True):
        module.model.fused_loss = fused
        module.zero_grad(set_to_none=True)
        loss = module.training_step(dict(batch), 0)
        loss.backward()
        results.append((loss.detach(), module.audio_input.proj.weight.grad.clone()))
    (plain_loss, plain_grad), (fused_loss, fused_grad) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-7)
    assert plain_grad.abs().sum() > 0


@pytest.mark.slow  # seconds of work: left out of the fast tier (-m "not slow")
def test_module_transcribes_continuous_prompts(tmp_path, toy_tokenizer):
    tok = toy_tokenizer
    module, _ = continuous_module(tmp_path, tok.vocab_size, tokenizer=tok)
    enc = module.audio_input.encoder
    fmt = ContinuousASRFormatter(TaskFormatter(tok), enc.n_frames, "drop")
    ws = waves(16000, 6000)
    batch = collate_asr_generation([fmt.asr_generation(w, "abc", f"k{i}") for i, w in enumerate(ws)], tok.pad_id,
                                   tok.modality_of)
    hyps = module.transcribe(batch)
    # the batched, left-padded continuous prompt decodes each row exactly like that row alone
    alone = [module.transcribe(collate_asr_generation([fmt.asr_generation(w, "abc", "x")], tok.pad_id,
                                                      tok.modality_of))[0] for w in ws]
    assert hyps == alone


def test_audio_config_validation():
    with pytest.raises(ValueError, match="audio.mode must be"):
        AudioFrontendConfig.from_any({"mode": "spectrogram"})
    with pytest.raises(ValueError, match="needs audio.encoder"):
        AudioFrontendConfig.from_any({"mode": "continuous", "encoder": None})
    with pytest.raises(ValueError, match="audio.markers must be"):
        AudioFrontendConfig.from_any({"mode": "continuous", "encoder": {"kind": "hubert"}, "markers": "both"})


def test_continuous_path_with_mfcc_frames(toy_tokenizer):
    """audio.encoder.kind=mfcc on the continuous preset: HuBERT-only keys are dropped, frame counts agree."""
    tok = toy_tokenizer
    cfg = AudioFrontendConfig.from_any({"mode": "continuous", "encoder": {"kind": "mfcc", "checkpoint": None,
                                                                          "layer": "last", "arch": "tiny"}})
    audio_input = ContinuousAudioInput(build_continuous_encoder(cfg), hidden_size=16)
    fmt = ContinuousASRFormatter(TaskFormatter(tok), frame_counter(cfg.encoder), "drop")
    ws = waves(16000, 7777)
    batch = collate_teacher_forced([fmt.asr(w, "abc", f"k{i}") for i, w in enumerate(ws)], tok.pad_id,
                                   tok.modality_of)
    spliced = audio_input.splice(torch.zeros(*batch["input_ids"].shape, 16), batch["audio_mask"],
                                 batch["audio_waves"], batch["audio_wave_lengths"])
    for row, w in enumerate(ws):
        torch.testing.assert_close(spliced[row, batch["audio_mask"][row]], audio_input.proj(audio_input.encoder(w)))
    with pytest.raises(ValueError, match=r"keys \['n_fft_typo'\]"):
        AudioFrontendConfig.from_any({"mode": "continuous", "encoder": {"kind": "mfcc", "n_fft_typo": 3}})
