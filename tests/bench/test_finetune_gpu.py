"""bench/finetune_gpu.py on CPU: its cases, data, rates, the parsing of finetune's own lines, the memory meter
and the plan's refusal. (`python bench/finetune_gpu.py --device cpu --tiny` runs the whole flow, in about
half a minute: too long for the suite.)"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import finetune_gpu as fg  # noqa: E402
import serve_gpu  # noqa: E402

from conftest import TINY_LLAMA, write_config  # noqa: E402


def test_cases_run_the_most_important_first():
    cases = fg.parse_cases(fg.CASES)
    assert [c.name for c in cases[:4]] == ["finetune 2048x1", "finetune 512x4", "finetune 8192x1", "ref 2048x1"]
    assert {(c.seq_len, c.micro_batch) for c in cases if c.kind == fg.FINETUNE} == \
        {(s, b) for s in (512, 2048, 8192) for b in (1, 4)}
    assert [c.name for c in cases if c.kind == fg.REFERENCE] == ["ref 2048x1", "ref 512x4"]
    with pytest.raises(SystemExit, match="'2048' is not SEQxBATCH"):
        fg.parse_cases("2048x1,2048")


def test_the_words_pack_into_full_sequences(tmp_path):
    from transformers import AutoTokenizer

    from heavylift.finetune.data import pack_texts

    serve_gpu.save_word_tokenizer(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    fg.write_words(tmp_path / "words.txt", 3 * 2, 16)
    examples = pack_texts(tokenizer, [(tmp_path / "words.txt").read_text()], 16)
    assert [len(e.input_ids) for e in examples] == [16] * 6
    assert examples[0].input_ids[0] == tokenizer.bos_token_id and examples[-1].input_ids[-1] == tokenizer.eos_token_id


def test_steady_rate_leaves_the_first_step_out():
    tokens = [100, 100, 100]
    # steps end at 2 s, 3 s and 4 s: the tokens/s so far after each is 50, 66.7 and 75
    ends = fg.ends_from_rates([50, 200 / 3, 75], tokens)
    assert ends == pytest.approx([2, 3, 4])
    assert fg.steady_rate(ends, tokens) == pytest.approx(100)  # 200 tokens in the last 2 s
    assert fg.steady_rate([2.0], [100]) is None


def test_finetune_lines_are_read_as_finetune_prints_them():
    from rich.console import Console

    from heavylift.commands.finetune import Lines, _summary
    from heavylift.finetune.loop import Step

    buffer = io.StringIO()
    lines = Lines(Console(file=buffer, highlight=False, soft_wrap=True), 1)
    lines.step(Step(1, 2, 11.76, 2e-4, 4096, 1234.4, 3.3, 10_980_000_000))
    lines.step(Step(2, 2, 11.70, 1e-4, 4096, 23456.0, 0.2, 11_020_000_000))
    summary = SimpleNamespace(steps=2, first_loss=11.76, last_loss=11.7, first_eval=None, last_eval=None,
                              tokens_per_s=23456.0, memory_bytes=11_020_000_000, seconds=0.35)
    text = buffer.getvalue() + _summary(SimpleNamespace(summary=lambda: summary, out="adapter")) + "\n"
    parsed = fg.parse_finetune(text)
    assert [(step, rate) for step, rate, _ in parsed["steps"]] == [(1, 1234.0), (2, 23456.0)]
    line, rate, peak = parsed["summary"]
    assert (rate, line.startswith("trained 2 steps")) == (23456.0, True)
    assert [gb for _, _, gb in parsed["steps"]] + [peak] == [10.98, 11.02, 11.02]


def test_the_meter_sees_a_child_hold_memory_and_stops_a_late_one(tmp_path):
    meter = fg.Meter("cpu")
    holds = [sys.executable, "-c", "import time; x = bytearray(300_000_000); time.sleep(0.5)"]
    memory, _, _, code = fg.run_child(holds, meter, 30, tmp_path / "holds")
    assert code == 0 and memory["measured_bytes"] >= 300_000_000 and not memory["timed_out"]
    memory, _, _, code = fg.run_child([sys.executable, "-c", "import time; time.sleep(30)"], meter, 0.5,
                                      tmp_path / "late")
    assert memory["timed_out"] and code != 0


def test_a_case_the_plan_refuses_records_its_line_and_runs_nothing(tmp_path):
    folder = write_config(tmp_path / "tiny", TINY_LLAMA)
    plans = {}
    record = fg.run_case(fg.Case(fg.FINETUNE, 1024, 1), SimpleNamespace(steps=2, device="cpu"), folder, None, plans,
                         10)
    assert record["refused"] == ("error: --seq-len 1,024 is longer than the 512 positions llama takes "
                                 "(max_position_embeddings); pass --seq-len 512 or less")
    assert "command" not in record and list(plans) == ["1024x1"]
    assert fg.table([record]).splitlines()[1] == f"finetune 1024x1  {record['refused']}"
