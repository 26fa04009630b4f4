"""Small corpora in their REAL layouts (file names, columns, compression, codecs), for tests and benchmarks.

Speech is flite speaking WordNet sentences (or any waveform you pass); Common Voice clips are real 48 kHz MP3
and VoxPopuli real Ogg Vorbis, both encoded by libsndfile (LAME / libvorbis).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ...audio.io import resample
from ..flite import Utterance, synthesize

COMMONVOICE_HEADER = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
                      "age", "gender", "accents", "variant", "locale", "segment")
VOXPOPULI_HEADER = ("id", "raw_text", "normalized_text", "speaker_id", "split", "gender", "is_gold_transcript",
                    "accent")


@dataclass
class Clip:
    text: str
    wave: np.ndarray  # float32 mono at 16 kHz


def speak(texts: list[str], voices: tuple[str, ...] = ("slt", "rms", "awb", "kal16")) -> list[Clip]:
    """flite speech for each text (voices in turn), 16 kHz float32."""
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "x.wav")
        for i, text in enumerate(texts):
            synthesize(Utterance(f"u{i}", text, text, voices[i % len(voices)]), wav)
            wave, rate = sf.read(wav, dtype="float32")
            assert rate == 16000, rate
            clips.append(Clip(text, wave))
    return clips


def at_rate(wave: np.ndarray, rate: int) -> np.ndarray:
    return wave if rate == 16000 else resample(torch.from_numpy(wave), 16000, rate).numpy()


# ------------------------------------------------------------------------------------------- LibriSpeech
def write_librispeech(root: Path, split: str, clips: list[Clip], speakers=(19, 84), chapters_per_speaker=2) -> Path:
    """`root/LibriSpeech/<split>/<spk>/<chap>/<spk>-<chap>-NNNN.flac` + `<spk>-<chap>.trans.txt` (upper case)."""
    split_dir = root / "LibriSpeech" / split
    groups: dict[tuple[int, int], list[tuple[str, Clip]]] = {}
    for i, clip in enumerate(clips):
        spk = speakers[i % len(speakers)]
        chap = 100 * spk + (i // len(speakers)) % chapters_per_speaker
        groups.setdefault((spk, chap), []).append(clip)
    for (spk, chap), group in groups.items():
        d = split_dir / str(spk) / str(chap)
        d.mkdir(parents=True, exist_ok=True)
        lines = []
        for j, clip in enumerate(group):
            utt = f"{spk}-{chap}-{j:04d}"
            sf.write(d / f"{utt}.flac", clip.wave, 16000, format="FLAC", subtype="PCM_16")
            words = "".join(c for c in clip.text.upper() if c.isalpha() or c in " '")
            lines.append(f"{utt} {' '.join(words.split())}")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return split_dir


# ------------------------------------------------------------------------------------------- LibriHeavy
def write_libriheavy(root: Path, subset: str, clips: list[Clip], per_recording: int = 3, gap_s: float = 0.5) -> Path:
    """Recordings (clips joined with silence gaps) under `download/librilight/<subset>/<spk>/<book>/<file>.flac`
    and `libriheavy_cuts_<subset>.jsonl.gz`: MonoCuts whose start/duration select each clip."""
    cuts = []
    gap = np.zeros(int(gap_s * 16000), np.float32)
    for r in range(0, len(clips), per_recording):
        group = clips[r : r + per_recording]
        spk = str(100 + r // per_recording % 2)
        book = f"book_{r // per_recording:02d}_librivox_64kb_mp3"
        rec_id = f"{subset}/{spk}/{book}/{r // per_recording:02d}_chapter_64kb"
        rel = f"download/librilight/{rec_id}.flac"
        pieces, offsets, t = [], [], 0
        for clip in group:
            pieces += [gap, clip.wave]
            offsets.append((t + len(gap), len(clip.wave)))
            t += len(gap) + len(clip.wave)
        pieces.append(gap)
        audio = np.concatenate(pieces)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, audio, 16000, format="FLAC", subtype="PCM_16")
        recording = {"id": rec_id, "sources": [{"type": "file", "channels": [0], "source": rel}],
                     "sampling_rate": 16000, "num_samples": len(audio), "duration": len(audio) / 16000,
                     "channel_ids": [0]}
        for k, (clip, (start, n)) in enumerate(zip(group, offsets)):
            cut_id = f"{rec_id}_{k}"
            cuts.append({
                "id": cut_id, "start": start / 16000, "duration": n / 16000, "channel": 0,
                "supervisions": [{"id": cut_id, "recording_id": rec_id, "start": 0.0, "duration": n / 16000,
                                  "channel": 0, "language": "English", "speaker": spk,
                                  "custom": {"texts": [clip.text, clip.text.upper()], "pre_texts": ["", ""],
                                             "begin_byte": 0, "end_byte": len(clip.text)}}],
                "recording": recording, "custom": {"text_path": f"download/librilight_text/{book}/text.txt"},
                "type": "MonoCut"})
    path = root / f"libriheavy_cuts_{subset}.jsonl.gz"
    write_jsonl_gz(path, cuts)
    return path


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------- Common Voice
def write_commonvoice(lang_dir: Path, splits: dict[str, list[Clip]], rate: int = 48000) -> Path:
    """`<lang>/clips/common_voice_en_<n>.mp3` (MP3 at `rate`, LAME via libsndfile) and `<split>.tsv` with the
    release's header."""
    clips_dir = lang_dir / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    n, encoded = 40_000_000, {}  # a clip repeated in the list is encoded once (benchmarks repeat clips)
    for split, clips in splits.items():
        rows = []
        for i, clip in enumerate(clips):
            n += 1
            name = f"common_voice_en_{n}.mp3"
            if id(clip) not in encoded:
                buf = io.BytesIO()
                sf.write(buf, at_rate(clip.wave, rate), rate, format="MP3")
                encoded[id(clip)] = buf.getvalue()
            (clips_dir / name).write_bytes(encoded[id(clip)])
            rows.append((f"{'ab' * 32}{i % 3}"[-64:], name, f"{n:064x}"[:64], clip.text, "", "2", "0",
                         "twenties", "male_masculine" if i % 2 else "female_feminine", "", "", "en", ""))
        write_tsv(lang_dir / f"{split}.tsv", COMMONVOICE_HEADER, rows)
    return lang_dir


def write_tsv(path: Path, header, rows) -> None:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------- VoxPopuli
def write_voxpopuli(lang_dir: Path, splits: dict[str, list[Clip]], ext: str = "ogg") -> Path:
    """`<lang>/asr_<split>.tsv` + `<lang>/<year>/<id>.ogg` (Vorbis, 16 kHz), as VoxPopuli's get_asr_data.py."""
    n = 0
    for split, clips in splits.items():
        rows = []
        for i, clip in enumerate(clips):
            n += 1
            utt_id = f"2018{n % 2 + 1:02d}12-0900-PLENARY-{n + 3}-en_20180612-14:52:{n:02d}_{n % 4}"
            d = lang_dir / utt_id[:4]
            d.mkdir(parents=True, exist_ok=True)
            if ext == "ogg":
                sf.write(d / f"{utt_id}.ogg", clip.wave, 16000, format="OGG", subtype="VORBIS")
            else:
                sf.write(d / f"{utt_id}.wav", clip.wave, 16000, format="WAV", subtype="PCM_16")
            normalized = " ".join("".join(c for c in clip.text.lower() if c.isalpha() or c in " '").split())
            rows.append((utt_id, clip.text, normalized, str(1000 + i % 3), split, "female" if i % 2 else "male",
                         "True", "None"))
        write_tsv(lang_dir / f"asr_{split}.tsv", VOXPOPULI_HEADER, rows)
    return lang_dir


# ------------------------------------------------------------------------------------------- text / chat
def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def refinedweb_rows(texts: list[str]) -> list[dict]:
    """Rows with RefinedWeb's columns (content, url, timestamp, dump, segment, image_urls)."""
    return [{"content": t, "url": f"https://example.org/{i}", "timestamp": f"2023-01-{i % 28 + 1:02d}T00:00:00Z",
             "dump": "CC-MAIN-2023-06", "segment": "1674764494852.95", "image_urls": []}
            for i, t in enumerate(texts)]


def smoltalk_rows(dialogues: list[list[tuple[str, str]]], source: str = "smol-magpie-ultra") -> list[dict]:
    """SmolTalk rows: {"messages": [{"content", "role"}], "source"}."""
    return [{"messages": [{"content": text, "role": role} for role, text in d], "source": source}
            for d in dialogues]
