"""Data: demo corpus (WordNet sentences spoken by flite), shard schema, task formatting, the DataModule.

Names are imported lazily: `python -m most_lightning.data.demo_corpus` must not have imported its own module
already (runpy warns), and the DataModule pulls in Lightning (~5 s) which the corpus tools do not need.
"""

from importlib import import_module

_EXPORTS = {
    "batching": ["BATCHINGS"],
    "chat": ["ChatRecord", "ChatTurn", "decode_chat_sample"],
    "datamodule": ["DEFAULT_TASK_WEIGHTS", "MoSTDataModule", "derangement"],
    "demo_corpus": ["DemoCorpusRecipe", "build_demo_corpus", "corpus_dir_for", "load_manifest"],
    "flite": ["FliteNotFoundError"],
    "pipeline": ["ShardCursor", "SourceMixStream", "TooFewShardsError"],
    "settings": ["DatasetSettings", "EvalSettings", "LoaderSettings", "QualitySettings", "StreamSettings",
                 "TokenizerSettings"],
    "samples": ["BadChatError", "BadSampleError", "CorruptShardError", "EmptyTranscriptError", "EmptyTurnError",
                "InvalidUnitsError", "MissingMemberError", "NotMonoAudioError", "OverlongSampleError",
                "TranscriptEncodingError", "UndecodableAudioError", "WrongSampleRateError"],
    "sources": ["SourceSpec", "corpus_sources", "parse_sources", "resolve_shards"],
    "tasks": ["ALL_TASKS", "ASR_INSTRUCTION", "IGNORE_INDEX", "TTS_INSTRUCTION", "Example", "GenerationExample",
              "TaskFormatter"],
    "text_sources": ["normalize_transcript", "wordnet_sentences"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
