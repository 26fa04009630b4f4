"""Task formatting (docs/model_spec.md section 4): ASR, TTS and text LM examples with loss on the response only.

    prompt   = BOS + instruction + "\\n\\n" + input + EOS + "\\n\\nOutput: "
    response = BOS + output + EOS                       (labels = ids; prompt labels = -100)
    text LM  = BOS + text + EOS                         (loss on all but BOS)
    speech LM = BOS + audio span + EOS                  (unit continuation; loss on all but BOS)
    chat     = BOS [+ system + "\n\n"] + ("User: " + turn + "\n\n" | "Assistant: " + turn + EOS + "\n\n")...
               (loss on the assistant turns' content + EOS only; text_chat uses every turn's text,
                speech_chat a turn's audio span where the turn was voiced and its text otherwise)

Audio spans are `encode_units(units)` = [begin-of-audio] + unit tokens + [end-of-audio], with the tokenizer's
real ids. Pieces are tokenised separately (instruction, text, constant tail), so a transcript always gets the
same ids whether it sits in a prompt, a response or a text LM sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from ..marks import IGNORE_INDEX  # noqa: F401 (re-exported)
from ..text.tokenizer import MoSTTokenizer
from .samples import OverlongSampleError

if TYPE_CHECKING:
    from .chat import ChatRecord

ASR_INSTRUCTION = "Transcribe the following speech into text."
TTS_INSTRUCTION = "Convert the following text into speech."
TASKS = ("asr", "tts", "text")  # what the demo corpus alone supports (speech + text shards)
# every task, by the kind of record it is made from
TASK_KIND = {"asr": "speech", "tts": "speech", "speech_lm": "speech", "text": "text",
             "text_chat": "chat", "speech_chat": "chat"}
ALL_TASKS = tuple(TASK_KIND)
MaxLengthPolicy = Literal["drop", "truncate"]


@dataclass
class Example:
    """One teacher-forced sequence. `n_skipped` carries bad-sample counts to the batch it lands in."""

    input_ids: list[int]
    labels: list[int]
    task: str
    key: str
    n_skipped: int = 0
    truncated: bool = False
    # continuous audio (MoST-C, data/continuous.py): waveform and where its frame slots start / how many
    audio: Any = None
    audio_start: int = -1
    audio_frames: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class GenerationExample:
    prompt_ids: list[int]
    reference_text: str
    key: str
    n_skipped: int = 0
    audio: Any = None
    audio_start: int = -1
    audio_frames: int = 0


class TaskFormatter:
    """Formats records as tasks and applies the max-length policy.

    max_length_policy 'drop': an over-long example raises OverlongSampleError (the loader's on_bad_sample then
    skips and counts it, or raises); 'truncate': it is cut to max_length and counted in `n_truncated`.
    """

    def __init__(self, tokenizer: MoSTTokenizer, max_length: int | None = None,
                 max_length_policy: MaxLengthPolicy = "drop"):
        if max_length_policy not in ("drop", "truncate"):
            raise ValueError(f"max_length_policy must be 'drop' or 'truncate', got {max_length_policy!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (or None), got {max_length}")
        self.tok = tokenizer
        self.max_length = max_length
        self.policy = max_length_policy
        self.n_truncated = 0
        t = tokenizer
        self._asr_head = [t.bos_id] + t.encode_text(ASR_INSTRUCTION + "\n\n")
        self._tts_head = [t.bos_id] + t.encode_text(TTS_INSTRUCTION + "\n\n")
        self._tail = [t.eos_id] + t.encode_text("\n\nOutput: ")
        self._user, self._assistant, self._sep = t.encode_text("User: "), t.encode_text("Assistant: "), t.encode_text("\n\n")

    # ------------------------------------------------------------------ prompts
    def asr_prompt_ids(self, units: Sequence[int]) -> list[int]:
        return self._asr_head + self.tok.encode_units(units) + self._tail

    def tts_prompt_ids(self, text: str) -> list[int]:
        return self._tts_head + self.tok.encode_text(text) + self._tail

    def _with_response(self, prompt: list[int], output: list[int], task: str, key: str) -> Example:
        response = [self.tok.bos_id] + output + [self.tok.eos_id]
        return self.limit(Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response, task, key))

    # ------------------------------------------------------------------ tasks
    def asr(self, units: Sequence[int], text: str, key: str = "") -> Example:
        return self._with_response(self.asr_prompt_ids(units), self.tok.encode_text(text), "asr", key)

    def tts(self, text: str, units: Sequence[int], key: str = "") -> Example:
        return self._with_response(self.tts_prompt_ids(text), self.tok.encode_units(units), "tts", key)

    def text_lm(self, text: str, key: str = "") -> Example:
        ids = [self.tok.bos_id] + self.tok.encode_text(text) + [self.tok.eos_id]
        return self.limit(Example(ids, [IGNORE_INDEX] + ids[1:], "text", key))

    def speech_lm(self, units: Sequence[int], key: str = "") -> Example:
        ids = [self.tok.bos_id] + self.tok.encode_units(units) + [self.tok.eos_id]
        return self.limit(Example(ids, [IGNORE_INDEX] + ids[1:], "speech_lm", key))

    def chat(self, record: "ChatRecord", speech: bool) -> Example:
        """A multi-turn dialogue; labels only on assistant content + EOS. speech=True uses the audio span of
        every voiced turn (a dialogue without any voiced turn is a bad sample for speech_chat)."""
        task = "speech_chat" if speech else "text_chat"
        if speech and not record.has_speech:
            from .samples import BadChatError

            raise BadChatError(record.key, record.shard, "speech_chat needs a voiced turn (units), this chat has none")
        t = self.tok
        ids, labels = [t.bos_id], [IGNORE_INDEX]

        def add(piece: list[int], learn: bool) -> None:
            ids.extend(piece)
            labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

        last = len(record.turns) - 1
        for i, turn in enumerate(record.turns):
            content = t.encode_units(turn.units) if speech and turn.units else t.encode_text(turn.text)
            sep = self._sep if i < last else []
            if turn.role == "system":
                add(content + sep, False)
            elif turn.role == "user":
                add(self._user + content + sep, False)
            else:
                add(self._assistant, False)
                add(content + [t.eos_id], True)
                add(sep, False)
        return self.limit(Example(ids, labels, task, record.key))

    def format(self, task: str, key: str, text: str, units: Sequence[int] | None = None) -> Example:
        if task == "asr":
            return self.asr(units, text, key)
        if task == "tts":
            return self.tts(text, units, key)
        if task == "text":
            return self.text_lm(text, key)
        if task == "speech_lm":
            return self.speech_lm(units, key)
        raise ValueError(f"unknown task {task!r}; known: {ALL_TASKS} (chat tasks: use .chat)")

    def asr_generation(self, units: Sequence[int], reference_text: str, key: str = "") -> GenerationExample:
        """Prompt only (the model must produce BOS + text + EOS); over-long prompts follow the policy too."""
        prompt = self.asr_prompt_ids(units)
        if self.max_length is not None and len(prompt) > self.max_length:
            if self.policy == "drop":
                raise OverlongSampleError(key, "?", f"prompt has {len(prompt)} tokens > max_length {self.max_length}")
            # keep the instruction and the constant tail so the model still sees where to answer
            keep = self.max_length - len(self._tail)
            prompt = prompt[:keep] + self._tail
            self.n_truncated += 1
        return GenerationExample(prompt, reference_text, key)

    # ------------------------------------------------------------------ length
    def limit(self, ex: Example) -> Example:
        if self.max_length is None or len(ex) <= self.max_length:
            return ex
        if self.policy == "drop":
            raise OverlongSampleError(ex.key, "?", f"{ex.task} example has {len(ex)} tokens > max_length {self.max_length}")
        self.n_truncated += 1
        ex.input_ids, ex.labels, ex.truncated = ex.input_ids[: self.max_length], ex.labels[: self.max_length], True
        return ex
