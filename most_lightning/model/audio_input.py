"""MoST-C continuous audio input: frozen encoder features -> trainable Linear(feat_dim -> hidden) -> spliced into
the token embeddings at the frame slots the data side laid out (`audio_mask`, see data/continuous.py).

A batch without audio still runs the projection, on zero frames: it adds an exact zero and gives the
projection an exact zero gradient, so every rank of a data-parallel run (DDP, DeepSpeed ZeRO, FSDP2) reduces
the same parameters whatever modalities its batch holds (a parameter without a gradient on some ranks breaks
ZeRO's collectives: a mismatch on gloo, a hang on NCCL).

Lives beside the decoder, not inside `MoSTForCausalLM`, so the decoder's `reset_parameters` (or an import of
pretrained LM weights) can never touch the loaded encoder weights -- a defect of the reference code. The
encoder comes built (most_lightning.audio.frontend.build_continuous_encoder): the model reads no audio config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ContinuousAudioInput(nn.Module):
    def __init__(self, encoder: Any, hidden_size: int, init_std: float = 0.02):
        super().__init__()
        if isinstance(encoder, nn.Module):
            self.encoder = encoder  # moves with the LightningModule to the accelerator
        else:  # e.g. the MFCC encoder: no weights, runs on the CPU
            object.__setattr__(self, "encoder", encoder)
        self.proj = nn.Linear(encoder.dim, hidden_size, bias=True)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    @property
    def feature_dim(self) -> int:
        return self.encoder.dim

    @torch.no_grad()
    def features(self, waves: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Frozen features of each row with audio (lengths > 0), in row order; each waveform is cut to its own
        length first, so padding never reaches the encoder."""
        rows = [waves[i, : int(n)] for i, n in enumerate(lengths.tolist()) if n > 0]
        if hasattr(self.encoder, "encode_batch"):
            return self.encoder.encode_batch(rows)
        return [self.encoder(w.cpu()) for w in rows]

    def without_audio(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """token_embeds plus an exact zero that depends on the projection (a matmul over zero frames), so the
        projection gets an exact zero gradient when training on a batch without audio; unchanged otherwise.
        Runs the projection's own forward so ZeRO-3 / FSDP2 gather its weights as usual."""
        if not (torch.is_grad_enabled() and self.proj.weight.requires_grad):
            return token_embeds
        none = token_embeds.new_zeros(0, self.proj.in_features, dtype=self.proj.weight.dtype)
        return token_embeds + self.proj(none).sum().to(token_embeds.dtype)

    def splice(self, token_embeds: torch.Tensor, audio_mask: torch.Tensor, waves: torch.Tensor,
               lengths: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """token_embeds [B, T, H] with the audio_mask slots replaced by projected frames (row-major order)."""
        feats = self.features(waves, lengths)
        slots = audio_mask.sum(1)
        rows = [i for i, n in enumerate(lengths.tolist()) if n > 0]
        if [int(slots[i]) for i in rows] != [f.shape[0] for f in feats] or int(slots.sum()) != sum(
                f.shape[0] for f in feats):
            names = [keys[i] if keys else str(i) for i in rows]
            raise ValueError(f"audio frame slots {[int(slots[i]) for i in rows]} do not match the encoder's frame "
                             f"counts {[f.shape[0] for f in feats]} for rows {names}: the data side and the model "
                             "use different encoders (audio.encoder must be the same for both)")
        if not feats:
            return self.without_audio(token_embeds)
        frames = torch.cat(feats).to(device=token_embeds.device, dtype=self.proj.weight.dtype)
        projected = self.proj(frames).to(token_embeds.dtype)
        return token_embeds.masked_scatter(audio_mask[..., None].expand_as(token_embeds), projected)

