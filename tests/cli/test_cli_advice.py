"""`heavylift plan` advice through the CLI: each advised value, planned as the user would type it, fits, and the
value one past it does not; the values expected are found by planning, as a user would check them."""

from __future__ import annotations

import json
import re

from heavylift.cli import main
from heavylift.defaults import ADVICE_CONTEXT_STEP_TOKENS
from heavylift.planner.advice import next_context

from conftest import write_config

# Mixtral-8x22B's config.json values (mistralai/Mixtral-8x22B-v0.1), which the catalog does not carry.
MIXTRAL_8X22B = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 6144,
                 "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
                 "intermediate_size": 16384, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "vocab_size": 32768, "max_position_embeddings": 65536, "rope_theta": 1000000.0,
                 "rms_norm_eps": 1e-05, "sliding_window": None, "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16"}
OFFLOAD_HINT = " or pass --allow-offload to spill to CPU RAM (slow)"


def plan_json(capsys, model: str, *args: str) -> dict:
    """The one precision planned by `heavylift plan MODEL ARGS --json`."""
    try:
        main(["plan", model, *args, "--json"])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    (scheme,) = json.loads(capsys.readouterr().out)["schemes"]
    return scheme


def fits(scheme: dict) -> bool:
    return scheme["fits"] and scheme["offload_bytes"] == 0


def advised(scheme: dict, pattern: str) -> list[str]:
    return [m.group(1) for line in scheme["advice"] if (m := re.match(pattern, line))]


def fewest_gpus_by_planning(capsys, model: str, card: str, start: int, *args: str) -> int:
    """The fewest `card`s from `start` up on which the plan fits, one count at a time."""
    n = start
    while not fits(plan_json(capsys, model, "--gpus", f"{n}x{card}", *args)):
        n += 1
    return n


def gpus_line(n: int, card: str, quant: str) -> str:
    return f"use --gpus {n}x{card}: the fewest of these that hold {quant} at this context"


def test_405b_int8_at_16k_on_five_h100s_advises_the_six_that_fit(capsys):
    # At 8k five hold it (their middle cards prefilling half a chunk at a time); at 16k the KV cache does not fit.
    args = ("--quant", "int8", "--context", "16384")
    assert fits(plan_json(capsys, "llama3.1-405b", "--gpus", "5xH100", "--quant", "int8"))
    scheme = plan_json(capsys, "llama3.1-405b", "--gpus", "5xH100", *args)
    assert not fits(scheme)
    n = fewest_gpus_by_planning(capsys, "llama3.1-405b", "H100-80GB", 6, *args)
    assert n == 6
    assert gpus_line(n, "H100-80GB", "int8") in scheme["advice"]


def test_405b_nf4_dq_at_long_context_and_batch_8(capsys):
    args = ("--context", "131072", "--batch", "8", "--quant", "nf4-dq")
    scheme = plan_json(capsys, "llama3.1-405b", "--gpus", "8xH100", *args)
    assert not fits(scheme)

    def on_8(context: int, batch: int = 8) -> dict:
        return plan_json(capsys, "llama3.1-405b", "--gpus", "8xH100", "--context", str(context),
                         "--batch", str(batch), "--quant", "nf4-dq")

    (context,) = map(int, advised(scheme, r"use --context (\d+): the longest context that fits in nf4-dq at "
                                          r"batch 8$"))
    assert fits(on_8(context)) and not fits(on_8(next_context(context, 131072)))
    assert fits(on_8(88000)) and context >= 88000 // ADVICE_CONTEXT_STEP_TOKENS * ADVICE_CONTEXT_STEP_TOKENS
    (batch,) = map(int, advised(scheme, r"use --batch (\d+): the largest batch that fits in nf4-dq at context "
                                        r"131072$"))
    assert fits(on_8(131072, batch)) and not fits(on_8(131072, batch + 1))
    n = fewest_gpus_by_planning(capsys, "llama3.1-405b", "H100-80GB", 9, *args)
    assert gpus_line(n, "H100-80GB", "nf4-dq") in scheme["advice"]


def test_405b_int8_on_eight_h100s_has_room_for_the_models_maximum(capsys):
    scheme = plan_json(capsys, "llama3.1-405b", "--gpus", "8xH100", "--quant", "int8")
    assert fits(scheme)
    assert fits(plan_json(capsys, "llama3.1-405b", "--gpus", "8xH100", "--quant", "int8", "--context", "131072"))
    assert "room for --context 131072 at batch 1 (the model's maximum)" in scheme["advice"]


def test_405b_int8_on_rtx_4090s_gets_a_gpu_count(capsys):
    args = ("--quant", "int8")
    scheme = plan_json(capsys, "llama3.1-405b", "--gpus", "8xRTX4090", *args)
    (n,) = map(int, advised(scheme, r"use --gpus (\d+)xRTX-4090: the fewest of these that hold int8 at this "
                                    r"context$"))
    assert n > 8
    assert fits(plan_json(capsys, "llama3.1-405b", "--gpus", f"{n}xRTX-4090", *args))
    assert not fits(plan_json(capsys, "llama3.1-405b", "--gpus", f"{n - 1}xRTX-4090", *args))


def test_gpu_advice_for_cards_given_by_size_is_a_spec_gpus_accepts(capsys):
    args = ("--quant", "bf16")
    scheme = plan_json(capsys, "llama3.1-405b", "--gpus", "2x48GB", *args)
    (n,) = map(int, advised(scheme, r"use --gpus (\d+)x48GB: the fewest of these that hold bf16 at this "
                                    r"context$"))
    assert fits(plan_json(capsys, "llama3.1-405b", "--gpus", f"{n}x48GB", *args))
    assert not fits(plan_json(capsys, "llama3.1-405b", "--gpus", f"{n - 1}x48GB", *args))


def _mixtral_8x22b(tmp_path) -> str:
    return str(write_config(tmp_path / "mixtral-8x22b", MIXTRAL_8X22B))


def _nothing_fits_line(scheme: dict, capacity_bytes: int, fix: str) -> str:
    return (f"even --context {ADVICE_CONTEXT_STEP_TOKENS} does not fit at batch 1: the weights take "
            f"{scheme['weights_bytes'] / 1e9:.1f} GB of the {capacity_bytes / 1e9:.1f} GB these devices hold, too "
            f"little is left beside them for the runtime; {fix}")


def test_mixtral_8x22b_just_over_one_h100_says_what_is_short(tmp_path, capsys):
    model, args = _mixtral_8x22b(tmp_path), ("--quant", "nf4-dq")
    scheme = plan_json(capsys, model, "--gpus", "1xH100", *args)
    (device,) = scheme["per_device"]
    capacity = device["total_bytes"] + device["free_bytes"]
    assert not fits(scheme) and scheme["weights_bytes"] < capacity  # over, but not by its weights
    short = plan_json(capsys, model, "--gpus", "1xH100", "--context", str(ADVICE_CONTEXT_STEP_TOKENS), *args)
    assert not fits(short)
    n = fewest_gpus_by_planning(capsys, model, "H100-80GB", 2, *args)
    assert scheme["advice"] == [
        f"does not fit: H100-80GB (#0) is {-device['free_bytes'] / 1e9:.1f} GB over its {capacity / 1e9:.1f} GB",
        gpus_line(n, "H100-80GB", "nf4-dq"),
        _nothing_fits_line(scheme, capacity, "add GPUs" + OFFLOAD_HINT),
    ]


def test_mixtral_8x22b_with_offload_does_not_advise_offload(tmp_path, capsys):
    model, args = _mixtral_8x22b(tmp_path), ("--quant", "nf4-dq", "--allow-offload")
    scheme = plan_json(capsys, model, "--gpus", "1xH100", *args)
    (device,) = scheme["per_device"]
    capacity = device["total_bytes"] + device["free_bytes"]
    assert scheme["offload_bytes"] > 0
    n = fewest_gpus_by_planning(capsys, model, "H100-80GB", 2, *args)
    assert scheme["advice"][0].startswith(f"offloads {scheme['offload_bytes'] / 1e9:.1f} GB to CPU RAM")
    assert scheme["advice"][1:] == [gpus_line(n, "H100-80GB", "nf4-dq"),
                                    _nothing_fits_line(scheme, capacity, "add GPUs")]
