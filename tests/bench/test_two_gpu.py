"""bench/two_gpu.py on CPU: --parts, the budget's shares, the rooflines of each device's share, records, the
table, bounded children, and the CPU check's engine split over two device handles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import two_gpu as tg  # noqa: E402


def test_parts_run_in_their_order_and_a_wrong_list_names_the_choices():
    assert tg.parse_parts("decode,run") == ("run", "decode")
    assert tg.parse_parts(" validate ") == ("validate",)
    for bad in ("run,speed", "", ","):
        with pytest.raises(ValueError) as e:
            tg.parse_parts(bad)
        assert str(e.value) == f"--parts takes a comma-separated list of run, decode, validate, not {bad!r}"


def test_each_part_selects_its_children():
    assert tg.units_of(("run",)) == ("8b", "70b-nf4-dq", "70b-fp8")
    assert tg.units_of(("decode",)) == ("70b-nf4-dq", "70b-fp8")
    assert tg.units_of(("run", "decode"), ("fp8",)) == ("8b", "70b-fp8")
    assert tg.units_of(("validate",)) == ()


def test_the_budget_is_shared_out_before_anything_starts():
    assert tg.stage_seconds(480, ("run", "decode", "validate")) == 480 * (0.35 + 0.25)
    assert tg.stage_seconds(300, ("run", "validate")) == 300 * 0.35 / 0.75
    assert tg.stage_seconds(480, ("decode",)) == 480
    assert tg.stage_seconds(480, ("validate",)) == 0
    assert tg.validate_budget(200) == 110  # room for the last case validate_plan.py starts
    assert tg.validate_budget(60) == 0


def test_rooflines_of_the_slower_share_and_of_both_in_turn():
    # 1 GiB and 2 GiB of weights at 1 TiB/s: 2^-10 s and 2^-9 s per step at batch 1.
    shares = [tg.Share(0, (0, 10), 2**30, 2**26, 2.0**40), tg.Share(1, (10, 20), 2**31, 0, 2.0**40)]
    assert tg.rooflines(shares, 1) == {"slower_share_device": 1, "slower_share_tok_s": 512.0,
                                       "serial_tok_s": 1 / (2**30 + 2**26 + 2**31) * 2.0**40}
    # batch 16: device 0 reads 16 sequences' 2^26 bytes of cache more, 2^31 in all, as much as device 1
    assert tg.rooflines(shares, 16) == {"slower_share_device": 0, "slower_share_tok_s": 16 * 512.0,
                                        "serial_tok_s": 16 * 256.0}


@pytest.fixture(scope="module")
def slice_plan(tmp_path_factory):
    """The 70B shape cut to 20 layers, planned as heavylift.load plans it on two H100s (config only)."""
    import heavylift
    import validate_plan as vp
    from heavylift.model.catalog import require_model

    folder = tmp_path_factory.mktemp("slice")
    (folder / "config.json").write_text(json.dumps(vp.cut_layers(require_model("llama3.1-70b").config_dict(), 20)))
    return heavylift.plan(str(folder), gpus="2xH100", context=4096, batch=1, quant="nf4-dq")


def test_shares_are_the_plans_own_bytes_per_device(slice_plan):
    scheme = slice_plan.scheme("nf4-dq")
    bandwidths = {d.device.index: d.device.bandwidth_bytes_s for d in scheme.per_device}
    shares = tg.planned_shares(slice_plan.architecture, scheme, 160, bandwidths)
    first, second = scheme.per_device
    embedding = 128256 * 8192 * 2  # vocab x hidden, bf16: a step reads one row of it
    kv = 10 * 160 * 2 * 8 * 128 * 2  # 10 layers x 160 tokens x (key + value) x 8 kv heads x 128 dims x bf16
    assert [(s.device, s.layers) for s in shares] == [(0, (0, 10)), (1, (10, 20))]
    assert [s.weight_bytes for s in shares] == [first.weights_bytes - embedding, second.weights_bytes]
    assert [s.kv_bytes for s in shares] == [kv, kv]
    # At the planned context and batch 1 on datasheet bandwidths, both shares in turn are the plan's own bound.
    at_context = tg.planned_shares(slice_plan.architecture, scheme, 4096, bandwidths)
    assert tg.rooflines(at_context, 1)["serial_tok_s"] == scheme.decode_tok_s_upper_bound


def test_greedy_record_says_equal_or_where_the_tokens_part():
    same = tg.greedy_record("m", "bf16", "a", "b", [5, 6, 7], [5, 6, 7], 0.0)
    assert same == {"part": "run", "kind": "greedy", "model": "m", "quant": "bf16", "a": "a", "b": "b", "tokens": 3,
                    "equal": True, "matching_prefix": 3, "first_logits_rel_diff": 0.0}
    parted = tg.greedy_record("m", "fp8", "a", "b", [5, 6, 7], [5, 6, 9], 0.25)
    assert (parted["equal"], parted["matching_prefix"], parted["first_logits_rel_diff"]) == (False, 2, 0.25)


def test_accelerates_device_map_per_device():
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, **{f"model.layers.{i}": 0 for i in range(9)},
                  **{f"model.layers.{i}": 1 for i in range(9, 20)}, "model.norm": 1, "lm_head": 1}
    assert tg.device_map_summary(device_map) == {
        "0": {"layers": [0, 9], "modules": ["model.embed_tokens", "model.rotary_emb"]},
        "1": {"layers": [9, 20], "modules": ["model.norm", "lm_head"]}}
    assert tg.device_map_summary({"": "cpu"}) == {"cpu": {"layers": None, "modules": [""]}}


def test_the_table_lists_every_record_kind_and_what_did_not_run():
    device = {"index": 0, "layers": [0, 16], "predicted_bytes": 9.6e9, "max_memory_allocated": 9.1e9,
              "max_memory_reserved": 9.4e9, "measured_bytes": 9.5e9, "error_pct": 1.05}
    result = {
        "records": [
            {"kind": "memory", "model": "m", "quant": "bf16", "gpus": 2,
             "devices": [device, {**device, "index": 1, "layers": [16, 32], "measured_bytes": None,
                                  "error_pct": None}]},
            tg.greedy_record("m", "bf16", "heavylift 2 GPUs", "heavylift 1 GPU", [1, 2], [1, 2], 0.0),
            {"kind": "decode", "model": "m", "quant": "fp8", "stack": "heavylift", "gpus": 2, "batch": 1,
             "decode_tok_s": 150.0, "serial_tok_s": 200.0, "slower_share_tok_s": 300.0}],
        "validate": {"cases": [{"measured_bytes": 1, "oom": False, "fits_predicted": True,
                                "devices": [{"error_pct": 0.5}, {"error_pct": -4.0}]},
                               {"skipped": "x", "devices": []}]},
        "not_started": ["70b-fp8: reference on 2 GPUs"],
        "errors": [{"step": "70b-fp8: heavylift on 1 GPU", "error": "OutOfMemoryError: no"}]}
    assert tg.table_lines(result) == [
        "memory | model quant gpus | per device: layers, planned / peak allocated / peak reserved / driver peak GB "
        "(plan error)",
        "memory | m bf16 2 | #0 0-16: 9.60 / 9.10 / 9.40 / 9.50 (+1.1%) ; #1 16-32: 9.60 / 9.10 / 9.40 / -",
        "greedy | model quant | a vs b | equal | matching prefix | first logits rel diff",
        "greedy | m bf16 | heavylift 2 GPUs vs heavylift 1 GPU | yes | 2/2 | 0.00e+00",
        "decode | model quant | stack gpus | batch | tok/s | % serial roofline | % slower-share roofline",
        "decode | m fp8 | heavylift 2 | 1 | 150.0 | 75.0 | 50.0",
        "validate | 1 of 2 two-GPU cases measured, 1 of 2 devices within 3%, worst 4.0%, 0 planned to fit ran out of "
        "memory",
        "not started | 70b-fp8: reference on 2 GPUs",
        "error | 70b-fp8: heavylift on 1 GPU | OutOfMemoryError: no"]


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    return subprocess.run([sys.executable, str(BENCH / "two_gpu.py"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_mistakes_are_one_line_and_exit_2(tmp_path):
    done = _cli("--parts", "run,speed", "--out", str(tmp_path / "r.json"))
    assert (done.returncode, done.stderr) == (2, "--parts takes a comma-separated list of run, decode, validate, "
                                                 "not 'run,speed'\n")
    done = _cli("--parts", "run")
    assert (done.returncode, done.stderr) == (2, "--out is required: the results file, e.g. --out $OUT/two_gpu.json\n")


def test_without_two_gpus_it_says_so_before_starting_anything(tmp_path):
    from heavylift.hardware.detect import detect_devices

    if sum(d.kind == "cuda" for d in detect_devices()) >= 2:
        pytest.skip("this machine has two GPUs")
    done = _cli("--out", str(tmp_path / "r.json"))
    assert done.returncode == 2 and done.stderr.startswith("two GPUs are needed and ")
    assert done.stderr.endswith(" are here; run it on a two-GPU machine, or pass --cpu-check\n")
    assert not (tmp_path / "r.json").exists()


def test_a_child_past_the_deadline_is_ended_with_its_own_children(tmp_path):
    pid_file = tmp_path / "grandchild"
    script = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    t = time.monotonic()
    code, tail = tg.run_bounded([sys.executable, "-c", script], time.time() + 2)
    assert code is None and tail == "started\n" and time.monotonic() - t < 2 + 2 * tg.KILL_GRACE_S
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.2)  # ended: gone, or a zombie where this container's init does not reap orphans
    assert not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert tg.run_bounded([sys.executable, "-c", "print('hi')"], time.time() + 60) == (0, "hi\n")


def test_a_unit_starts_no_step_past_its_deadline_and_goes_on_after_an_error(tmp_path):
    import two_gpu_units as units

    out = tmp_path / "unit.json"
    u = units.Unit("8b", time.time() + 60, out, units.Machine(cpu_check=True), tmp_path, 20)
    assert u.step("works", lambda: 7) == 7
    assert u.step("fails", lambda: 1 / 0) is None
    u.deadline = time.time() - 1
    assert u.step("too late", lambda: 7) is None
    doc = json.loads(out.read_text())
    assert [(s["step"], s["status"]) for s in doc["steps"]] == [("8b: works", "ok"), ("8b: fails", "error")]
    assert doc["errors"] == [{"step": "8b: fails", "error": "ZeroDivisionError: division by zero"}]
    assert doc["not_started"] == ["too late"] and doc["running"] is None


def test_the_cpu_checks_second_device_splits_the_engines_pipeline_and_changes_no_token():
    import torch
    from transformers import LlamaConfig

    import two_gpu_units as units
    from heavylift.engine.model import Engine
    from heavylift.engine.weights import DENSE

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320)
    whole = Engine.from_random(config, DENSE, "cpu", batch=1, context=64, ops="torch")
    split = units.split_engine(whole, 3)
    assert units.engine_segments(split) == [{"device": "cpu", "layers": [0, 3]}, {"device": "cpu:0", "layers": [3, 4]}]

    def tokens(engine):
        token, out = engine.prefill(list(range(10))).argmax(-1), []
        for _ in range(6):
            out.append(int(token))
            token = engine.decode(token.view(-1)).argmax(-1)
        return out

    assert tokens(split) == tokens(whole)
    assert torch.equal(split.prefill(list(range(10))), whole.prefill(list(range(10))))
