"""Training data: a JSONL file of chat samples or texts, or a plain text file, read and checked line by line,
then tokenized into examples of at most --seq-len tokens with their labels.

Chat samples (`{"messages": [{"role", "content"}, ...]}`) are rendered with the tokenizer's chat template and
learn only their assistant turns (each turn's text and the end-of-turn marker the template puts after it);
every other label is IGNORE. Texts (a .txt file, or JSONL lines with a "text" field) are tokenized with the
tokenizer's BOS and EOS around each, concatenated, and cut into --seq-len pieces that learn every token.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from heavylift.errors import DataError

CHAT, TEXT = "chat", "text"
IGNORE = -100  # the label transformers' loss skips
ASSISTANT = "assistant"
PLAIN_TEXT_SUFFIX = ".txt"  # a file read whole as one text; any other file is JSONL
FIX = 'one JSON object per line, {"messages": [...]} or {"text": ...}'
TEMPLATE_REASON_CHARS = 160  # a chat template's refusal is quoted up to this many characters, on one line


@dataclass(frozen=True)
class Dataset:
    """A data file as read: its samples (chat: message lists; text: strings) and its content's hash."""

    path: Path
    kind: str  # CHAT or TEXT
    samples: tuple
    lines: tuple[int, ...]  # each sample's line in the file (1 for a .txt file)
    sha256: str


@dataclass(frozen=True)
class Example:
    """One training sequence: its tokens and the label of each (the token itself, or IGNORE)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def learned(self) -> int:
        """Positions whose next token is learned: transformers' loss shifts the labels by one."""
        return sum(label != IGNORE for label in self.labels[1:])


def read_data(path: Path, flag: str = "--data") -> Dataset:
    """Read and check `path`, one line at a time; DataError naming the line of the first problem."""
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file; give a .jsonl of chat samples or texts, or a .txt")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{flag} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{flag} {path} is empty; give it {FIX}, or text in a .txt file")
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix == PLAIN_TEXT_SUFFIX:
        return Dataset(path, TEXT, (text,), (1,), digest)
    kind, samples, lines = None, [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        sample_kind, sample = _parse_line(path, number, line)
        if kind is None:
            kind, first = sample_kind, number
        elif sample_kind != kind:
            raise DataError(f"{path} line {number} is a {sample_kind} sample but line {first} is a {kind} sample; "
                            "keep one kind per file")
        samples.append(sample)
        lines.append(number)
    return Dataset(path, kind, tuple(samples), tuple(lines), digest)


def _parse_line(path: Path, number: int, line: str) -> tuple[str, object]:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); give {FIX}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object; give {FIX}")
    if "messages" in record:
        return CHAT, _messages(where, record["messages"])
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(f'{where}: "text" must be a non-empty string')
        return TEXT, record["text"]
    raise DataError(f'{where} has neither "messages" nor "text"; give {FIX}')


def _messages(where: str, messages: object) -> tuple[dict, ...]:
    well_formed = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not well_formed:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects '
                        "with string values")
    if not any(m["role"] == ASSISTANT for m in messages):
        raise DataError(f'{where}: the chat sample has no "{ASSISTANT}" turn to learn from; add one or drop the line')
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


@dataclass(frozen=True)
class Encoded:
    """A dataset as training examples, and what tokenizing it cut or dropped."""

    examples: tuple[Example, ...]
    cut: int  # chat samples longer than --seq-len, cut to it
    dropped: int  # chat samples whose assistant turns all lay past --seq-len


def encode(dataset: Dataset, tokenizer, seq_len: int, model: str) -> Encoded:
    """The dataset's examples: each chat sample one example (cut to `seq_len`), texts packed into `seq_len`."""
    if dataset.kind == TEXT:
        return Encoded(pack_texts(tokenizer, dataset.samples, seq_len), 0, 0)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{dataset.path} holds chat samples, and {model}'s tokenizer has no chat template; "
                        'give texts instead ({"text": ...} lines or a .txt file)')
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"chat samples need {model}'s fast tokenizer (tokenizer.json) to find the assistant turns; "
                        "add tokenizer.json to the model folder")
    examples, cut, dropped = [], 0, 0
    for messages, line in zip(dataset.samples, dataset.lines):
        example = chat_example(tokenizer, messages, f"{dataset.path} line {line}")
        if len(example.input_ids) > seq_len:
            cut += 1
            example = Example(example.input_ids[:seq_len], example.labels[:seq_len])
        if example.learned:
            examples.append(example)
        else:
            dropped += 1
    return Encoded(tuple(examples), cut, dropped)


def _render(tokenizer, messages: Sequence[dict], where: str, generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 - a template's own refusal (jinja's raise_exception) names the rule
        reason = str(e).splitlines()[0][:TEMPLATE_REASON_CHARS] if str(e) else type(e).__name__
        raise DataError(f"{where}: the chat template refuses this conversation ({reason})") from None


def assistant_spans(tokenizer, messages: Sequence[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered, and the character span of each assistant turn in it: from the end of the
    conversation before it (rendered with the generation prompt) to the end of the conversation through it.
    DataError where the template renders earlier turns differently once later ones follow."""
    full = _render(tokenizer, messages, where, generation=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = _render(tokenizer, messages[:i], where, generation=True)
        through = _render(tokenizer, messages[:i + 1], where, generation=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template renders earlier turns differently once later turns follow, "
                            "so the assistant turns cannot be found; give one assistant turn per sample")
        spans.append((len(before), len(through)))
    return full, spans


def chat_example(tokenizer, messages: Sequence[dict], where: str) -> Example:
    """One chat sample's tokens, labelled where a token starts inside an assistant turn."""
    text, spans = assistant_spans(tokenizer, messages, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(encoded["input_ids"])
    labels = tuple(token if any(start <= first < end for start, end in spans) else IGNORE
                   for token, (first, _) in zip(ids, encoded["offset_mapping"]))
    return Example(ids, labels)


def pack_texts(tokenizer, texts: Sequence[str], seq_len: int) -> tuple[Example, ...]:
    """Texts tokenized, each between BOS and EOS where the tokenizer has them, run together and cut into
    pieces of `seq_len` tokens (the last one shorter); every token is learned."""
    stream: list[int] = []
    for text in texts:
        if tokenizer.bos_token_id is not None:
            stream.append(tokenizer.bos_token_id)
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    pieces = [tuple(stream[i:i + seq_len]) for i in range(0, len(stream), seq_len)]
    return tuple(Example(p, p) for p in pieces if len(p) > 1)


def split_held_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[tuple[Example, ...],
                                                                                    tuple[Example, ...]]:
    """(training, held-out): `fraction` of the examples (at least one where there are two or more, none at
    fraction 0) drawn by `seed`, the rest in their order."""
    count = 0 if fraction <= 0 or len(examples) < 2 else min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return (tuple(e for i, e in enumerate(examples) if i not in held),
            tuple(e for i, e in enumerate(examples) if i in held))
