"""Training data: chat samples learn their assistant turns only, texts are packed into --seq-len pieces,
the held-out split is seeded, and a chat file trains end to end."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from finetune.conftest import train_args
from heavylift.finetune.data import IGNORE, chat_example, pack_texts, read_data, split_held_out

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the quick brown fox"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "today"}]


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def test_a_chat_sample_learns_its_assistant_turns_and_their_end_markers_only(tokenizer):
    example = chat_example(tokenizer, CONVERSATION, "sample")
    assert tokenizer.decode(example.input_ids) == ("<s><|system|>be brief<|end|><|user|>hello world<|end|><|assistant|>"
                                                   "the quick brown fox<|end|><|user|>how are you<|end|><|assistant|>"
                                                   "today<|end|>")
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert [label for label in example.labels if label != IGNORE] == learned
    assert tokenizer.decode(learned) == "the quick brown fox<|end|>today<|end|>"
    # Learned tokens come in two runs, each right after the template's "<|assistant|>".
    starts = [i for i in range(len(example.labels)) if example.labels[i] != IGNORE and
              (i == 0 or example.labels[i - 1] == IGNORE)]
    assert [tokenizer.decode(example.input_ids[i - 1]) for i in starts] == ["<|assistant|>", "<|assistant|>"]


def test_texts_are_packed_between_bos_and_eos_into_seq_len_pieces(tokenizer):
    texts = ["hello world", "the quick brown fox"]
    stream = [1, *tokenizer("hello world")["input_ids"], 2, 1, *tokenizer("the quick brown fox")["input_ids"], 2]
    pieces = pack_texts(tokenizer, texts, 4)
    assert [list(p.input_ids) for p in pieces] == [stream[i:i + 4] for i in range(0, len(stream), 4)
                                                   if len(stream[i:i + 4]) > 1]
    assert all(p.labels == p.input_ids for p in pieces)


def test_the_held_out_split_is_seeded_and_never_takes_everything():
    examples = tuple(range(40))
    train, held = split_held_out(examples, 0.05, seed=1)
    assert len(held) == 2 and sorted(train + held) == list(examples)
    assert split_held_out(examples, 0.05, seed=1) == (train, held)
    assert split_held_out(examples, 0.05, seed=2)[1] != held
    assert split_held_out((7,), 0.5, seed=0) == ((7,), ())
    assert split_held_out(examples, 0.0, seed=0) == (examples, ())


def test_a_txt_file_is_one_text_and_blank_jsonl_lines_are_skipped(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("{not json}\n\nplain text")
    assert read_data(txt).samples == ("{not json}\n\nplain text",)
    jsonl = tmp_path / "lines.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    data = read_data(jsonl)
    assert (data.kind, data.samples, data.lines) == ("text", ("a", "b"), (1, 3))


def test_a_chat_file_trains(base, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION[1:3]}) + "\n" for _ in range(8)))
    code, _, err = run_cli(capsys, *train_args(base, data, tmp_path / "out", "--steps", "2", "--eval-fraction", "0.25"))
    assert code == 0, err
    assert "6 training and 2 held-out examples" in err.splitlines()[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
