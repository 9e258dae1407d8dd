"""`heavylift run` and `heavylift.load` on CPU with tiny random checkpoints of every family."""

from __future__ import annotations

import json

import pytest

import heavylift
from heavylift.errors import InvalidArgumentError, OffloadError
from heavylift.model.families import FAMILIES
from heavylift.runtime.loader import Placement, guard_offload

from conftest import TINY_FAMILIES, run_cli, save_runnable_checkpoint

GREEDY = dict(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_runnable_checkpoint(root / f, f) for f in TINY_FAMILIES}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family_generates_in_bf16_and_nf4_dq(checkpoints, family):
    for quant in ("bf16", "nf4-dq"):
        session = heavylift.load(str(checkpoints[family]), quant=quant, context=256)
        record = session.generate("hello world", **GREEDY)
        assert record.generated_tokens >= 1 and record.prompt_tokens > 0
        assert session.quant == quant and session.attention == ("sdpa" if FAMILIES[family].sdpa else "eager")


@pytest.mark.parametrize("quant", ["bf16", "nf4", "nf4-dq", "int8"])
def test_streaming_equals_generate_for_greedy(checkpoints, quant):
    session = heavylift.load(str(checkpoints["llama"]), quant=quant, context=256)
    pieces = [r.text for r in session.stream("the quick brown fox", **GREEDY)]
    whole = session.generate("the quick brown fox", **GREEDY)
    assert "".join(pieces) == whole.text


def test_chunked_prefill_matches_transformers_generate(checkpoints, monkeypatch):
    import torch

    import heavylift.runtime.session as session_module

    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 3)  # force several prefill chunks
    session = heavylift.load(str(checkpoints["gemma2"]), quant="bf16", context=256)
    ids = session.encode("how are you today the quick brown fox jumps")
    ours = session.generate("how are you today the quick brown fox jumps", max_new_tokens=8, temperature=0)
    ref = session.model.generate(torch.tensor([ids]), max_new_tokens=len(ours.token_ids), do_sample=False)
    assert list(ours.token_ids) == ref[0, len(ids):].tolist()


def test_transformers_prefills_in_the_chunks_its_plan_names(checkpoints):
    """Session.prefill_chunk (the plan's DevicePlan.prefill_rows on transformers) sets the chunks a prompt goes
    in; the tokens are transformers' own."""
    import torch

    session = heavylift.load(str(checkpoints["gemma2"]), quant="bf16", context=256)
    assert session.engine is None and session.prefill_chunk == 0  # on a CPU: whole chunks
    session.prefill_chunk = 4
    pieces = []
    hook = session.model.model.register_forward_pre_hook(
        lambda _, args, kw: pieces.append(kw["input_ids"].shape[1]), with_kwargs=True)
    prompt = "how are you today the quick brown fox jumps"
    ids = session.encode(prompt)
    ours = session.generate(prompt, max_new_tokens=4, temperature=0)
    hook.remove()
    prefill = pieces[:-(len(ours.token_ids) - 1) or None]  # then one forward per decoded token
    assert prefill == [4] * (len(ids) // 4) + ([len(ids) % 4] if len(ids) % 4 else [])
    ref = session.model.generate(torch.tensor([ids]), max_new_tokens=len(ours.token_ids), do_sample=False)
    assert list(ours.token_ids) == ref[0, len(ids):].tolist()


def test_moe_experts_really_end_up_4bit_and_8bit(checkpoints):
    import torch

    from heavylift.runtime.experts import stored_expert_dtypes

    s4 = heavylift.load(str(checkpoints["mixtral"]), quant="nf4", context=128)
    assert stored_expert_dtypes(s4.model) == {torch.uint8}
    s8 = heavylift.load(str(checkpoints["mixtral"]), quant="int8", context=128)
    assert stored_expert_dtypes(s8.model) == {torch.int8}
    assert s4.generate("hello", **GREEDY).generated_tokens >= 1
    assert s8.generate("hello", **GREEDY).generated_tokens >= 1


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_moe_experts_are_quantized_as_they_load_not_after(tmp_path, monkeypatch, quant):
    """transformers sets the fused expert tensors one layer at a time; each is quantized before the next
    layer's arrive (at most the newest two unquantized at once, against every layer's before), and the
    model computes exactly what quantizing them all after loading computed."""
    import contextlib

    import torch

    import heavylift.runtime.experts as experts
    from conftest import save_tiny_checkpoint, save_tiny_tokenizer

    folder = save_tiny_checkpoint(tmp_path / "moe", "mixtral", num_hidden_layers=4, vocab_size=320, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    save_tiny_tokenizer(folder)
    arrived: list[tuple[torch.nn.Module, str]] = []
    most = 0

    def spy(module, name, param):
        nonlocal most
        if name in experts.EXPERT_PARAMS and param is not None and param.dtype == torch.bfloat16 and \
                param.device.type != "meta":
            arrived.append((module, name))
            most = max(most, sum(n in experts._expert_names(m) for m, n in arrived))

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(spy)
    try:
        streamed = heavylift.load(str(folder), quant=quant, context=64)
    finally:
        handle.remove()
    assert len(arrived) == 8 and most <= 2
    assert not any(experts._expert_names(m) for m in streamed.model.modules())
    monkeypatch.setattr(experts, "quantized_on_arrival", lambda quant: contextlib.nullcontext())
    after = heavylift.load(str(folder), quant=quant, context=64)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        assert torch.equal(streamed.model(ids).logits, after.model(ids).logits)


def test_cli_run_streams_and_summarises(checkpoints, capsys):
    code, out, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hello world", "--quant", "nf4",
                             "--max-new-tokens", "5", "--temperature", "0", "--context", "256")
    assert code == 0
    assert "prompt tokens" in err and "tok/s" in err and "nf4" in err


def test_cli_run_json(checkpoints, capsys, caplog):
    code, out, _ = run_cli(capsys, "run", str(checkpoints["qwen2"]), "--prompt", "hello", "--quant", "int8",
                           "--max-new-tokens", "4", "--seed", "1", "--context", "256", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"text", "prompt_tokens", "generated_tokens", "finish_reason", "prefill_tok_s", "decode_tok_s", "quant",
            "attention", "device_map", "devices"} <= result.keys()
    assert result["quant"] == "int8" and result["device_map"]["model.layers.1"] == "cpu"
    # bitsandbytes logs a cast on every int8 matmul of a bf16 model; heavylift drops it (loader.expected_int8_casts)
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert all({"planned_bytes", "allocated_bytes", "peak_bytes"} <= d.keys() for d in result["devices"].values())


@pytest.fixture
def tiny_machine(monkeypatch):
    """This machine as a CPU with 0.3 MB of RAM: too small for any tiny checkpoint."""
    import heavylift.hardware.detect as detect
    from heavylift.hardware.gpus import cpu_device

    monkeypatch.setattr(detect, "detect_devices", lambda: (cpu_device(300_000),))


def test_plan_that_cannot_fit_stops_before_loading_and_offload_passes_with_warning(checkpoints, capsys,
                                                                                      tiny_machine):
    folder = str(checkpoints["llama"])
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "hi", "--quant", "bf16", "--context", "64")
    assert code == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "run", folder, "--prompt", "hi", "--quant", "bf16", "--context", "64",
                             "--max-new-tokens", "3", "--allow-offload")
    assert code == 0 and "offloaded" in err and "tok/s at best" in err


def test_guard_counts_bytes_that_left_the_gpu():
    planned = Placement({"model.layers.0": "cuda:0", "model.layers.1": "cuda:0", "lm_head": "cuda:0"}, frozenset())
    real = {"model.layers.0": "cuda:0", "model.layers.1": "cpu", "lm_head": "disk"}
    sizes = {"model.layers.0": 10, "model.layers.1": 2_000_000_000, "lm_head": 500_000_000}
    with pytest.raises(OffloadError, match="2.00 GB on cpu, 0.50 GB on disk"):
        guard_offload(planned, real, sizes, allow_offload=False)
    assert guard_offload(planned, real, sizes, allow_offload=True) == {"cpu": 2_000_000_000, "disk": 500_000_000}
    on_cpu_machine = Placement({"model.layers.0": "cpu"}, frozenset())
    assert guard_offload(on_cpu_machine, {"model.layers.0": "cpu"}, sizes, allow_offload=False) == {}


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be between"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k must be 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
    (["--quant", "int4"], "--quant must be auto or one of"),
    (["--context", "8", "--max-new-tokens", "100"], "beyond --context 8"),
])
def test_run_mistakes_are_one_line_exit_2(checkpoints, capsys, args, message):
    code, _, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hello world", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_tokenizer_and_missing_weights(tmp_path, checkpoints, capsys):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(checkpoints["llama"], folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    (folder / "chat_template.jinja").unlink()
    code, _, err = run_cli(capsys, "run", str(folder), "--prompt", "hi", "--quant", "bf16")
    assert code == 2 and "no usable tokenizer" in err
    code, _, err = run_cli(capsys, "run", "llama3.1-8b", "--prompt", "hi")
    assert code == 2 and ("no weights here" in err or "does not fit" in err)


def test_truncated_shard_is_named_before_loading(tmp_path, checkpoints, capsys):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(checkpoints["llama"], folder)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "run", str(folder), "--prompt", "hi")
    assert code == 2 and "model.safetensors is truncated" in err


def test_sampling_is_reproducible_with_a_seed(checkpoints):
    session = heavylift.load(str(checkpoints["phi3"]), quant="bf16", context=256)
    a = session.generate("hello", max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = session.generate("hello", max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert a.token_ids == b.token_ids
    with pytest.raises(InvalidArgumentError):
        session.generate("hello", temperature=-0.5)


def test_the_plan_describes_the_runtime_that_runs(checkpoints):
    from heavylift.planner.memory import FAST, TRANSFORMERS

    folder = str(checkpoints["mistral"])  # a 32-token sliding window: the two runtimes cache differently
    auto = heavylift.load(folder, quant="bf16", context=256)  # no GPU here: transformers runs, and is planned
    assert auto.engine is None and auto.plan.workload.engine == TRANSFORMERS
    fast = heavylift.load(folder, quant="bf16", context=256, engine="fast")
    assert fast.engine is not None and fast.plan.workload.engine == FAST
    kv = [s.scheme.per_device[0].kv_cache_bytes for s in (auto, fast)]
    assert kv == [2 * 2 * 2 * 16 * 2 * 32, 2 * 2 * 2 * 16 * 2 * 256]  # layers x (K, V) x heads x dim x 2 B
    with pytest.raises(InvalidArgumentError, match="gemma2"):
        heavylift.load(str(checkpoints["gemma2"]), quant="bf16", context=256, engine="fast")


def test_transformers_prefill_fills_a_static_cache(checkpoints):
    import torch

    session = heavylift.load(str(checkpoints["llama"]), quant="bf16", context=64, batch=2, engine="transformers")
    with torch.inference_mode():
        logits, advance, cached = session.steps(torch.randint(0, 300, (2, 40)))
        assert logits.shape == (2, 320) and cached() == 40
        advance(logits.argmax(dim=-1, keepdim=True))
    assert cached() == 41 and isinstance(cached(), int)


def test_fp8_loads_a_block_of_rows_at_a_time_into_torchaos_own_storage(checkpoints, monkeypatch):
    # Without FP8 tensor cores the loader stores weights with torchao's Float8WeightOnlyConfig; heavylift feeds
    # it 16 rows at a time here (float8_load.py). Every weight must hold exactly what one whole-tensor call
    # stores, and the model must generate.
    import torch
    from safetensors.torch import load_file
    from torchao.quantization import Float8WeightOnlyConfig
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    import heavylift.runtime.float8_load as float8_load
    from heavylift.defaults import FP8_ROW_MULTIPLE
    from heavylift.schemes import scheme

    calls = []
    transform = float8_load._QUANTIZE_CONFIG_HANDLER[Float8WeightOnlyConfig]
    monkeypatch.setattr(float8_load, "LOAD_ROW_CHUNK_ELEMENTS", 64 * FP8_ROW_MULTIPLE)
    monkeypatch.setitem(float8_load._QUANTIZE_CONFIG_HANDLER, Float8WeightOnlyConfig,
                        lambda m, c, **kw: calls.append(m.weight.shape[0]) or transform(m, c, **kw))
    session = heavylift.load(str(checkpoints["llama"]), quant="fp8", context=256, engine="transformers")
    assert calls and max(calls) == FP8_ROW_MULTIPLE  # every weight went in pieces of 16 rows
    monkeypatch.undo()
    saved = {}
    for f in sorted(checkpoints["llama"].glob("*.safetensors")):
        saved.update(load_file(f))
    quantized = {n: m for n, m in session.model.named_modules() if isinstance(getattr(m, "weight", None), Float8Tensor)}
    assert len(quantized) == 7 * session.model.config.num_hidden_layers
    for name, module in quantized.items():
        whole = torch.nn.Linear(*reversed(module.weight.shape), bias=False, dtype=torch.bfloat16)
        whole.weight.data.copy_(saved[f"{name}.weight"])
        transform(whole, Float8WeightOnlyConfig())
        assert torch.equal(module.weight.qdata.view(torch.uint8), whole.weight.qdata.view(torch.uint8)), name
        assert torch.equal(module.weight.scale, whole.weight.scale), name
    assert session.scheme.weights_bytes == scheme("fp8").weights_bytes(session.plan.architecture.tensors)
    assert session.generate("the quick brown fox", **GREEDY).text is not None


# --- One resolution, one runtime decision, one plan -------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Calls of resolve_model, plan_runtimes and make_plan, wherever heavylift calls them from."""
    import heavylift.api as api
    import heavylift.model.source as source
    import heavylift.planner.make as planner
    import heavylift.planner.runtimes as runtimes

    counts = {"resolve": 0, "decide": 0, "plan": 0}

    def counting(key, function):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapped

    for module, name, key in ((source, "resolve_model", "resolve"), (api, "resolve_model", "resolve"),
                              (runtimes, "plan_runtimes", "decide"), (api, "plan_runtimes", "decide"),
                              (planner, "make_plan", "plan"), (api, "make_plan", "plan")):
        monkeypatch.setattr(module, name, counting(key, getattr(module, name)))
    return counts


@pytest.mark.parametrize("options", [dict(), dict(quant="nf4-dq", engine="fast"), dict(quant="int8"),
                                     dict(engine="transformers")], ids=["auto", "nf4-dq-fast", "int8", "hf"])
def test_load_resolves_the_model_once_decides_once_and_plans_once(checkpoints, counted, options):
    session = heavylift.load(str(checkpoints["llama"]), context=128, **options)
    assert counted == {"resolve": 1, "decide": 1, "plan": 1}
    assert session.generate("hello", **GREEDY).generated_tokens >= 1
    assert counted == {"resolve": 1, "decide": 1, "plan": 1}


def test_an_offloading_load_is_planned_once_for_transformers(checkpoints, counted, tiny_machine):
    from heavylift.planner.memory import TRANSFORMERS

    session = heavylift.load(str(checkpoints["llama"]), quant="bf16", context=64, allow_offload=True)
    assert counted == {"resolve": 1, "decide": 1, "plan": 1}
    assert session.scheme.offload is not None and session.scheme.engine == TRANSFORMERS


def test_plan_resolves_once_and_plans_once(counted):
    heavylift.plan("llama3.1-8b", gpus="1xH100")
    assert counted == {"resolve": 1, "decide": 1, "plan": 1}


# --- Cheap checks before any weight loads -----------------------------------------------------------------


@pytest.fixture
def no_weights_load(monkeypatch):
    """The loader refuses to run: a test passing with it shows the weights were never read."""
    import heavylift.runtime.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loader, "load_model", refuse)


@pytest.fixture(scope="module")
def variants(checkpoints, tmp_path_factory):
    """The llama checkpoint without its tokenizer, and without its chat template."""
    import shutil

    root = tmp_path_factory.mktemp("variants")
    folders = {}
    for name, drop in (("no-tokenizer", ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
                       ("no-template", ("chat_template.jinja",))):
        folders[name] = root / name
        shutil.copytree(checkpoints["llama"], folders[name])
        for f in drop:
            (folders[name] / f).unlink()
    return {**folders, "llama": checkpoints["llama"]}


LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 8


@pytest.mark.parametrize("folder, args, message", [
    ("no-tokenizer", ["--prompt", "hi"], "no usable tokenizer in"),
    ("llama", ["--prompt", LONG_PROMPT, "--context", "32", "--max-new-tokens", "1"], "beyond --context 32"),
    ("llama", ["--prompt", "hi", "--context", "16", "--max-new-tokens", "100"], "beyond --context 16"),
    ("no-template", ["--chat"], "--chat needs a chat template, and "),
    ("no-template", ["--prompt", "hi", "--system", "be brief"], "--system goes into the chat template, which this "
                                                                  "tokenizer lacks"),
    ("llama", ["--prompt", "hi", "--raw", "--system", "be brief"], "--raw skips; drop one of them"),
    ("llama", ["--prompt", "hi", "--raw", "--chat"], "--raw sends one prompt as it is, but --chat needs"),
    ("llama", ["--prompt", ""], "--prompt is empty; give the text to continue"),
    ("llama", ["--prompt", "hi", "--gpus", "8xH100"], "--gpus 8xH100 describes devices this machine lacks (it has "
                                                      "no GPU torch can use, only the CPU)"),
    ("llama", ["--prompt", "hi", "--gpus", "1x40GB"], "--gpus 1x40GB describes devices this machine lacks"),
    ("llama", ["--prompt", "hi", "--quant", "fp16", "--engine", "fast"], "fp16 runs on transformers; run it with "
                                                                          "--engine transformers"),
], ids=["tokenizer", "long-prompt", "long-output", "chat-template", "system", "raw-system", "raw-chat", "empty",
        "gpus", "gpus-size", "engine"])
def test_run_refuses_in_one_line_before_any_weight_loads(variants, capsys, no_weights_load, folder, args, message):
    code, out, err = run_cli(capsys, "run", str(variants[folder]), *args)
    assert (code, out) == (2, "")
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_prompt_is_wrapped_in_the_chat_template_unless_raw(variants, capsys):
    args = ["--prompt", "hello world", "--max-new-tokens", "2", "--temperature", "0", "--context", "64", "--json"]
    code, out, err = run_cli(capsys, "run", str(variants["llama"]), *args)
    assert code == 0 and err.splitlines() == ["prompt wrapped in the model's chat template; --raw to send it as is"]
    wrapped = json.loads(out)["prompt_tokens"]
    code, out, err = run_cli(capsys, "run", str(variants["llama"]), *args, "--raw")
    assert code == 0 and err == ""
    # raw: the text's own tokens; wrapped, with "<s><|user|>" before and "<|end|><|assistant|>" after
    assert wrapped == json.loads(out)["prompt_tokens"] + 4
    code, out, err = run_cli(capsys, "run", str(variants["no-template"]), *args)
    assert code == 0 and err == "" and json.loads(out)["prompt_tokens"] == wrapped - 4


def test_chat_takes_the_prompt_as_its_first_turn(variants, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    code, out, err = run_cli(capsys, "run", str(variants["llama"]), "--chat", "--prompt", "hello", "--context",
                             "64", "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0 and "chat: /reset" in err
    assert len(out.splitlines()) == 2 and out.endswith("\n>>> ")  # one reply, then the prompt /exit answered


# --- Run defects: the CPU's memory, Ctrl-C, out of memory ---------------------------------------------------


def test_a_cpu_run_compares_no_peak_it_cannot_measure(checkpoints, capsys):
    code, _, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "2",
                           "--context", "64", "--quant", "bf16")
    assert code == 0 and "plan vs measured" not in err and "peak" not in err
    code, out, _ = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "2",
                           "--context", "64", "--quant", "bf16", "--json")
    (cpu,) = json.loads(out)["devices"].values()
    assert cpu["peak_bytes"] is None and cpu["allocated_bytes"] > 0


@pytest.fixture
def ctrl_c_at_third_token(monkeypatch):
    from heavylift.runtime.sampling import Sampling

    choose, calls = Sampling.choose, []

    def interrupted(self, logits, generator):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return choose(self, logits, generator)

    monkeypatch.setattr(Sampling, "choose", interrupted)


def test_ctrl_c_while_streaming_exits_130_with_a_visible_notice(checkpoints, capsys, ctrl_c_at_third_token):
    code, out, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "8",
                             "--temperature", "0", "--context", "64", "--raw")
    assert code == 130 and out.endswith("\n")  # the line of text is ended before the notice
    assert err.splitlines()[-1] == "interrupted"


def test_ctrl_c_during_json_prints_what_was_generated(checkpoints, capsys, ctrl_c_at_third_token):
    code, out, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "8",
                             "--temperature", "0", "--context", "64", "--json")
    result = json.loads(out)
    assert code == 130 and err.splitlines()[-1] == "interrupted"
    assert (result["finish_reason"], result["generated_tokens"], result["prompt_tokens"]) == ("interrupted", 2, 6)


def test_out_of_memory_while_generating_names_the_knobs(checkpoints, capsys, monkeypatch):
    import re

    import torch
    import typer

    from heavylift.cli import app
    from heavylift.runtime.session import Session

    steps = Session.steps

    def out_of_memory_at_decode(self, prompts):
        logits, _, cached = steps(self, prompts)

        def advance(token):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return logits, advance, cached

    monkeypatch.setattr(Session, "steps", out_of_memory_at_decode)
    code, out, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "8",
                             "--context", "256", "--quant", "nf4")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 3  # note, header, error
    assert err.splitlines()[-1] == ("error: out of GPU memory at 6 prompt tokens with --context 256 in nf4; lower "
                                    "--context (to 128, say), or use a smaller --quant")
    run_options = {o for p in typer.main.get_command(app).commands["run"].params for o in p.opts}
    assert set(re.findall(r"--[a-z-]+", err.splitlines()[-1])) == {"--context", "--quant"} <= run_options


# --- What run prints on stderr: heavylift's own lines, and its progress bar on a terminal only -------------


@pytest.fixture(scope="module")
def run_as_a_user_would(checkpoints):
    """`heavylift run` in its own process, stderr a pipe (not a terminal), nothing filtered."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = str(checkpoints["llama"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(heavylift.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "heavylift", "run", folder, "--prompt", "hi", "--max-new-tokens",
                           "4", "--temperature", "0"], capture_output=True, text=True, env=env)
    return folder, done


def _heavylift_lines(folder: str) -> list[str]:
    import re

    return [re.escape("prompt wrapped in the model's chat template; --raw to send it as is"),
            re.escape(f"{folder}: bf16, transformers (the fast engine needs every layer on a CUDA GPU), attention "
                      "sdpa, devices cpu"),
            r"6 prompt tokens, prefill [\d.]+ tok/s, 4 generated at [\d.]+ tok/s"]


def test_run_in_its_own_process_prints_heavylifts_lines_and_no_progress(run_as_a_user_would):
    import re

    folder, done = run_as_a_user_would
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1
    ours = [line for line in done.stderr.splitlines() if any(re.fullmatch(p, line) for p in _heavylift_lines(folder))]
    assert len(ours) == 3 and "Loading weights" not in done.stderr and "tensors" not in done.stderr


def test_run_in_its_own_process_prints_only_heavylifts_lines(run_as_a_user_would):
    import re

    folder, done = run_as_a_user_would
    lines = done.stderr.splitlines()
    assert len(lines) == 3 and all(re.fullmatch(p, line) for p, line in zip(_heavylift_lines(folder), lines)), \
        done.stderr


def test_loading_on_a_terminal_shows_one_progress_bar(checkpoints, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    heavylift.load(str(checkpoints["llama"]), quant="nf4", context=64)
    shown = terminal.getvalue()
    # 2 layers x 9 tensors, the embeddings, the final norm, the head: each counted once it is placed
    assert "loading 1 shard in nf4" in shown and "21/21" in shown and "Loading weights" not in shown


def test_weights_that_land_off_the_plan_are_an_error_not_a_new_plan(checkpoints, counted, monkeypatch):
    import heavylift.runtime.loader as loader

    landed = loader.real_placement
    monkeypatch.setattr(loader, "real_placement", lambda model, names: {**landed(model, names),
                                                                         "model.layers.1": "disk"})
    with pytest.raises(InvalidArgumentError, match="needs every layer on a CUDA GPU; run it with --engine transformers"):
        heavylift.load(str(checkpoints["llama"]), quant="bf16", context=64, engine="fast", allow_offload=True)
    assert counted == {"resolve": 1, "decide": 1, "plan": 1}


def test_out_of_memory_while_loading_is_one_line(checkpoints, capsys, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)
    code, out, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--quant", "nf4", "--raw")
    assert (code, out) == (2, "") and err == ("error: out of GPU memory loading the weights in nf4, which the plan "
                                              "fits: another process may hold GPU memory (free it), or lower "
                                              "--context or use a smaller --quant\n")


def test_run_warns_before_loading_when_the_context_passes_the_models_positions(checkpoints, capsys):
    code, _, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "2",
                           "--temperature", "0", "--context", "1024", "--raw")
    assert code == 0 and err.splitlines()[0] == (
        "warning: --context 1,024 is longer than the 512 positions llama was trained on (max_position_embeddings): "
        "memory is planned, but text past that length degrades")
