"""Audio front end: waveform I/O, feature encoders, k-means unit quantizer, unit extractor."""

from .features import FeatureEncoder, MFCCConfig, MFCCEncoder, build_encoder
from .io import TARGET_SAMPLE_RATE, AudioDecodeError, audio_info, encode_audio, read_audio, resample, to_mono
from .quality import pnmi, utterance_pnmi
from .quantizer import KMeansQuantizer
from .units import UnitExtractor, dedup_units, sample_frames

__all__ = [
    "TARGET_SAMPLE_RATE", "AudioDecodeError", "FeatureEncoder", "KMeansQuantizer", "MFCCConfig", "MFCCEncoder",
    "UnitExtractor", "audio_info", "build_encoder", "dedup_units", "encode_audio", "pnmi", "read_audio",
    "resample", "sample_frames", "to_mono", "utterance_pnmi",
]
