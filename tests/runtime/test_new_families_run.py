"""Qwen 3, Qwen 3 MoE, Gemma 3, Llama 4, DeepSeek-V3 and gpt-oss run on CPU from tiny random checkpoints: planned,
loaded and generated greedily through `heavylift.load` and `heavylift run`, in every precision each accepts;
checkpoints stored in block FP8 or MXFP4 load dequantized; a precision a model cannot run is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

import heavylift

from heavylift.planner.runtimes import LACKS

from conftest import run_cli, save_runnable_checkpoint

NEW = ("qwen3", "qwen3_moe", "gemma3_text", "llama4_text", "deepseek_v3", "gpt_oss")
QUANTS = ("bf16", "fp16", "fp8", "int8", "nf4", "nf4-dq", "fp4")
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("new")
    return {f: save_runnable_checkpoint(root / f, f) for f in NEW}


@pytest.mark.parametrize("family", NEW)
def test_bf16_generation_is_transformers_greedy_generation(checkpoints, family):
    """heavylift's loop (a StaticCache of the plan's context, chunked prefill) gives the tokens transformers'
    own generate gives: the cache layouts (DeepSeek's latent, sliding and chunked windows) hold what the
    model reads back."""
    session = heavylift.load(str(checkpoints[family]), quant="bf16", context=128)
    ids = session.encode(PROMPT)
    ours = session.generate(PROMPT, max_new_tokens=8, temperature=0)
    with torch.inference_mode():
        ref = session.model.generate(torch.tensor([ids]), max_new_tokens=len(ours.token_ids), do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    assert list(ours.token_ids) == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("family", NEW)
def test_every_precision_the_family_accepts_generates(checkpoints, family):
    refused = {"deepseek_v3": {"int8"}}.get(family, set())
    for quant in QUANTS:
        if quant in refused:
            continue
        session = heavylift.load(str(checkpoints[family]), quant=quant, context=128)
        record = session.generate(PROMPT, max_new_tokens=3, temperature=0)
        assert record.generated_tokens == 3 and session.quant == quant, quant
        assert session.engine is None and session.engine_note  # on CPUs transformers' forward runs them
        if family != "qwen3":  # the engine runs Qwen 3 dense on CUDA GPUs
            assert session.engine_note.startswith("the fast engine runs llama, mistral, qwen2, qwen3 layers")


def test_experts_are_quantized_as_for_mixtral(checkpoints):
    from heavylift.runtime.experts import stored_expert_dtypes

    for family in ("qwen3_moe", "llama4_text", "deepseek_v3", "gpt_oss"):
        for quant, dtype in (("nf4", torch.uint8), ("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
            if (family, quant) == ("deepseek_v3", "int8"):
                continue
            session = heavylift.load(str(checkpoints[family]), quant=quant, context=64)
            assert stored_expert_dtypes(session.model) == {dtype}, (family, quant)


def test_llama4s_router_is_quantized_by_fp8_and_left_in_bf16_by_bitsandbytes(checkpoints):
    for quant, stored in (("fp8", "Float8Tensor"), ("nf4", "Parameter"), ("int8", "Parameter")):
        session = heavylift.load(str(checkpoints["llama4_text"]), quant=quant, context=64)
        router = session.model.model.layers[1].feed_forward.router
        assert type(router.weight).__name__ == stored, quant


@pytest.mark.parametrize("family", NEW)
def test_cli_run_greedy_json(checkpoints, capsys, family):
    code, out, _ = run_cli(capsys, "run", str(checkpoints[family]), "--prompt", "hello", "--quant", "nf4",
                           "--max-new-tokens", "3", "--temperature", "0", "--context", "128", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["quant"] == "nf4" and result["generated_tokens"] == 3
    assert result["attention"] == ("eager" if family == "gpt_oss" else "sdpa")


@pytest.mark.parametrize("family, lacks", [(k, v) for k, v in LACKS.items() if k in NEW])
def test_cli_says_in_one_line_why_transformers_runs_the_family(checkpoints, capsys, family, lacks):
    code, _, err = run_cli(capsys, "run", str(checkpoints[family]), "--prompt", "hello", "--quant", "bf16",
                           "--max-new-tokens", "2", "--temperature", "0", "--context", "64")
    assert code == 0
    line = next(x for x in err.splitlines() if "transformers (" in x)
    assert f"not {family}'s {lacks}" in " ".join(err.split()), line


def test_a_precision_the_family_cannot_run_is_one_line(checkpoints, capsys):
    code, out, err = run_cli(capsys, "run", str(checkpoints["deepseek_v3"]), "--prompt", "hi", "--quant", "int8",
                             "--context", "128")
    assert code == 2 and out == ""
    assert err == (f"error: {checkpoints['deepseek_v3']} cannot run in int8: LLM.int8 flattens 2-D and 3-D inputs "
                   "only, and DeepSeek-V3's kv_b_proj expands the cached latent as a 4-D one; use --quant bf16, fp16, "
                   "fp8, nf4, nf4-dq, fp4\n")


# --- Checkpoints stored quantized -------------------------------------------------------------------------

def _block_fp8(folder, block: int = 128) -> None:
    """Rewrite a bf16 checkpoint as a block-FP8 one, as DeepSeek-V3's is stored: every linear weight in
    float8_e4m3fn with a float32 weight_scale_inv per block, and config.json's quantization_config."""
    from safetensors.torch import load_file, save_file

    from heavylift.model.architecture import architecture_from_config

    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [block, block]}
    stored = {t.name for t in architecture_from_config(config).tensors if t.stored}
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    for name in sorted(stored):
        w = tensors[name].float()
        rows, cols = w.shape
        scale = torch.empty(-(-rows // block), -(-cols // block))
        q = torch.empty_like(w)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                piece = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
                scale[i, j] = piece.abs().max().clamp(min=1e-12) / 448.0
                q[i * block:(i + 1) * block, j * block:(j + 1) * block] = piece / scale[i, j]
        tensors[name] = q.to(torch.float8_e4m3fn)
        tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # MXFP4's e2m1 codes 0-7; 8-15 are their negatives


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weights as MXFP4: per block of 32 inputs a power-of-two scale (uint8, biased by 127) and 4-bit
    codes of the nearest e2m1 value, two to a byte, the even input in the low nibble."""
    out, inputs = w.shape
    blocks = w.float().view(out, inputs // 32, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-12) / 6.0))
    scaled = blocks / torch.exp2(exponent)[..., None]
    values = torch.tensor(FP4_VALUES)
    codes = (scaled.abs()[..., None] - values).abs().argmin(-1) + 8 * (scaled < 0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def _mxfp4_experts(folder) -> None:
    """Rewrite a bf16 gpt-oss checkpoint as openai/gpt-oss-* store theirs: each fused expert tensor ([experts, in,
    out] in the model) as [experts, out, in / 32, 16] code bytes and [experts, out, in / 32] scales."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        packed, scales = zip(*(_mxfp4(expert.t()) for expert in tensors.pop(name)))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = torch.stack(packed), torch.stack(scales)
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


def test_a_block_fp8_checkpoint_loads_dequantized_in_bf16_and_kept_in_fp8(tmp_path, capsys):
    """Without the `kernels` package (and on a CPU), fp8 keeps the block-FP8 weights and runs them through
    heavylift's torch matmuls; `heavylift run` generates greedily what the bf16 load of the same checkpoint
    generates. Both multiply by the same bf16 weights, bit for bit (block_fp8_matmul dequantizes as
    Fp8Dequantize does); only the matmul kernels differ (a tile's torch.mm per expert against torch's grouped
    matmul), which may round a logit's last bf16 bit otherwise, so the tokens agree unless two logits tie to
    that bit, as none do on this checkpoint."""
    import importlib.util

    from heavylift.runtime.block_fp8_matmul import dequantized_rows

    assert importlib.util.find_spec("kernels") is None  # the machine this test describes
    folder = save_runnable_checkpoint(tmp_path / "ds", "deepseek_v3")
    _block_fp8(folder, block=32)
    plan = heavylift.plan(str(folder), gpus="1xH100", context=64)
    assert [s.quant for s in plan.schemes] == ["bf16", "fp8"]
    assert plan.scheme("fp8").weights_bytes < plan.scheme("bf16").weights_bytes
    capsys.readouterr()  # the checkpoint's save above
    texts = {}
    for quant in ("fp8", "bf16"):
        code, out, err = run_cli(capsys, "run", str(folder), "--prompt", "hello", "--quant", quant, "--context", "64",
                                 "--max-new-tokens", "8", "--temperature", "0", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["quant"] == quant and result["generated_tokens"] == 8
        texts[quant] = result["text"]
    assert texts["fp8"] == texts["bf16"]
    kept = heavylift.load(str(folder), quant="fp8", context=64)
    dequantized = heavylift.load(str(folder), quant="bf16", context=64)
    for name in ("model.layers.0.self_attn.q_a_proj", "model.layers.1.mlp.shared_experts.down_proj"):
        fp8 = kept.model.get_submodule(name)
        assert fp8.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(dequantized_rows(fp8.weight, fp8.weight_scale_inv, (32, 32), 0, fp8.weight.shape[0],
                                            torch.bfloat16), dequantized.model.get_submodule(name).weight.data)
    assert kept.model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    ours = kept.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert list(ours.token_ids) == list(dequantized.generate(PROMPT, max_new_tokens=8, temperature=0).token_ids)


def test_fp8_of_a_block_fp8_checkpoint_is_refused_in_one_line_under_another_transformers(tmp_path, capsys,
                                                                                       monkeypatch):
    """heavylift's torch matmuls answer transformers 5.24's calls only: under another release, on a machine
    without the `kernels` package, keeping the weights is refused before any weight is read."""
    folder = save_runnable_checkpoint(tmp_path / "ds", "deepseek_v3")
    _block_fp8(folder, block=32)
    monkeypatch.setattr("heavylift.api.installed_transformers", lambda: "5.25.0")
    capsys.readouterr()
    code, out, err = run_cli(capsys, "run", str(folder), "--prompt", "hi", "--quant", "fp8", "--context", "64",
                             "--max-new-tokens", "3")
    assert code == 2 and out == ""
    assert err == ("error: --quant fp8 keeps the block-FP8 weights, which heavylift runs with transformers 5.24 (this "
                   "is 5.25.0), or transformers on GPUs of compute capability 8.9 or later with the `kernels` package; "
                   "install transformers 5.24 (pip install 'transformers>=5.24,<5.25'), or use --quant bf16 to "
                   "dequantize them while they load\n")


def test_a_block_fp8_weight_with_a_partial_edge_block_loads_dequantized(tmp_path, capsys):
    """DeepSeek-V3's kv_a_proj_with_mqa has kv_lora_rank + qk_rope_head_dim = 576 rows, stored in blocks of 128
    with a 5-row scale grid, the last block 64 rows. The tiny model in blocks of 64 is alike: 64 + 32 = 96 rows,
    2 scale rows. Its dequantized weight is each code times its block's scale, and `heavylift run` runs it."""
    folder = save_runnable_checkpoint(tmp_path / "ds", "deepseek_v3")
    _block_fp8(folder, block=64)
    from safetensors.torch import load_file

    (shard,) = folder.glob("*.safetensors")
    stored = load_file(shard)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    codes, scale = stored[f"{name}.weight"], stored[f"{name}.weight_scale_inv"]
    assert codes.shape == (96, 64) and scale.shape == (2, 1)
    expected = (codes.float() * scale.repeat_interleave(64, 0)[:96]).to(torch.bfloat16)
    capsys.readouterr()
    code, out, err = run_cli(capsys, "run", str(folder), "--prompt", "hi", "--quant", "bf16", "--context", "64",
                             "--max-new-tokens", "3", "--temperature", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["generated_tokens"] == 3
    session = heavylift.load(str(folder), quant="bf16", context=64)
    assert torch.equal(session.model.get_submodule(name).weight.data, expected)


def test_partial_edge_blocks_are_padded_to_whole_blocks_of_the_configured_size():
    from heavylift.runtime.block_fp8 import partial_grid_padding

    assert partial_grid_padding((576, 7168), (5, 56), (128, 128)) == (64, 0)  # DeepSeek-V3's kv_a_proj_with_mqa
    assert partial_grid_padding((96, 64), (2, 1), (64, 64)) == (32, 0)  # divisible grid, still a partial block
    assert partial_grid_padding((24576, 1536), (192, 12), (128, 128)) is None  # q_b_proj: whole blocks
    assert partial_grid_padding((4, 256, 64), (4, 256, 2), (128, 128)) is None  # an MXFP4-style [1, 32] grid


def test_an_mxfp4_checkpoint_loads_its_experts_dequantized(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder = save_runnable_checkpoint(tmp_path / "oss", "gpt_oss")
    reference = heavylift.load(str(folder), quant="bf16", context=64).model.model.layers[0].mlp.experts.gate_up_proj
    _mxfp4_experts(folder)
    session = heavylift.load(str(folder), quant="bf16", context=64)
    experts = session.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.shape == reference.shape
    from safetensors.torch import load_file

    (shard,) = folder.glob("*.safetensors")
    stored = load_file(shard)
    expected = convert_moe_packed_tensors(stored["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                                          stored["model.layers.0.mlp.experts.gate_up_proj_scales"])
    assert torch.equal(experts.gate_up_proj.data, expected)
    assert session.generate("hello", max_new_tokens=3, temperature=0).generated_tokens == 3
    with pytest.raises(heavylift.HeavyliftError, match="stored in MXFP4"):
        heavylift.load(str(folder), quant="nf4", context=64)
