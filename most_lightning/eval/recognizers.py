"""External speech recognisers (the judges of TTS intelligibility and the S->S answers), behind one interface.

    rec = build_recognizer({"kind": "pocketsphinx"})                 # offline, ships an English model
    rec = build_recognizer({"kind": "hf_ctc", "model_dir": "hubert-large-ls960-ft/"})   # as in the paper
    texts = rec.transcribe([wave, ...])                               # float waveforms [T] at 16 kHz

Nothing is downloaded: the HF directory must hold the model and its processor (save_pretrained layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

SAMPLE_RATE = 16_000


class Recognizer(Protocol):
    name: str
    sample_rate: int

    def transcribe(self, waves: Sequence[torch.Tensor]) -> list[str]:
        ...


class PocketSphinxRecognizer:
    """CMU PocketSphinx 5 with its bundled US-English acoustic model, language model and dictionary."""

    name = "pocketsphinx"
    sample_rate = SAMPLE_RATE

    def __init__(self, **decoder_options: Any):
        try:
            from pocketsphinx import Decoder
        except ImportError as err:  # pragma: no cover - a dependency of the eval extra
            raise ImportError("the pocketsphinx recogniser needs `pip install pocketsphinx` "
                              "(in most_lightning's dev/eval extras)") from err
        self.decoder = Decoder(samprate=self.sample_rate, loglevel="FATAL", **decoder_options)

    def transcribe(self, waves: Sequence[torch.Tensor]) -> list[str]:
        out = []
        for wave in waves:
            pcm = (np.clip(wave.detach().float().cpu().numpy(), -1, 1) * 32767).astype(np.int16)
            self.decoder.start_utt()
            if pcm.size:
                self.decoder.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            out.append(hyp.hypstr if hyp is not None else "")
        return out


class HFCTCRecognizer:
    """A local transformers CTC model directory (Wav2Vec2ForCTC / HubertForCTC + its processor), greedy CTC."""

    name = "hf_ctc"
    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 8):
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"hf_ctc model_dir={model_dir}: no config.json; expected a directory written "
                                    "by save_pretrained (model + processor), e.g. facebook/hubert-large-ls960-ft")
        from transformers import AutoModelForCTC, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForCTC.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def transcribe(self, waves: Sequence[torch.Tensor]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(waves), self.batch_size):
            chunk = [w.detach().float().cpu().numpy() for w in waves[start : start + self.batch_size]]
            chunk = [w if w.size else np.zeros(400, dtype=np.float32) for w in chunk]  # CTC needs some frames
            inputs = self.processor(chunk, sampling_rate=self.sample_rate, return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            logits = self.model(**inputs).logits
            out += [t.strip() for t in self.processor.batch_decode(logits.argmax(-1))]
        return out


RECOGNIZERS = {"pocketsphinx": PocketSphinxRecognizer, "hf_ctc": HFCTCRecognizer}


def build_recognizer(spec: Mapping[str, Any] | str) -> Recognizer:
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", None)
    if kind not in RECOGNIZERS:
        raise ValueError(f"recognizer kind={kind!r}: known kinds are {sorted(RECOGNIZERS)}")
    return RECOGNIZERS[kind](**spec)
