"""The fast engine on CPU: each Triton kernel (in Triton's interpreter) and its torch twin against a
float64 reference, and whole models against transformers' generate on the same quantized weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import heavylift
from heavylift.engine import Engine, unsupported_reason
from heavylift.engine import weights as W
from heavylift.engine.ops import TorchOps, TritonOps, attention_scratch
from heavylift.errors import InvalidArgumentError

from conftest import TINY_FAMILIES, save_runnable_checkpoint
from conftest import compile_apart, run_cli

pytestmark = pytest.mark.interpreter  # every test here runs the engine's kernels or its model on the CPU

KINDS = [W.DENSE, W.FP8, W.INT8, W.NF4, W.NF4_DQ]
OPS = [TorchOps, TritonOps]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "an output element was never written (still NaN)"
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def poisoned(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.bfloat16)


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: W.KIND_NAMES[k])
@pytest.mark.parametrize("rows", [1, 5])
def test_linear_parts_bias_and_residual_match_float64(ops, kind, rows):
    k = 256
    parts = [W.quantize(torch.randn(n, k) * 0.02, kind, bias=torch.randn(n).bfloat16()) for n in (96, 32, 32)]
    x = torch.randn(rows, k).bfloat16()
    residual = torch.randn(rows, 160).bfloat16()
    ref = torch.cat([x.double() @ p.dequantize(torch.float64).T + p.bias.double() for p in parts], dim=-1)
    assert rel_err(ops.linear(x, parts, poisoned(rows, 160)), ref) < 8e-3
    assert rel_err(ops.linear(x, parts, poisoned(rows, 160), residual=residual), ref + residual.double()) < 8e-3


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: W.KIND_NAMES[k])
@pytest.mark.parametrize("rows", [1, 3])
def test_glu_and_row_views_match(kind, rows):
    k = 192
    fused = W.quantize(torch.randn(128, k) * 0.02, kind)  # Phi-3 style gate_up: two halves of one weight
    gate, up = fused.rows(0, 64), fused.rows(64, 128)
    x = torch.randn(rows, k).bfloat16()
    full = fused.dequantize(torch.float64)
    g, u = x.double() @ full[:64].T, x.double() @ full[64:].T
    ref = torch.nn.functional.silu(g) * u
    torch_out = TorchOps.glu(x, gate, up, poisoned(rows, 64))
    triton_out = TritonOps.glu(x, gate, up, poisoned(rows, 64))
    assert rel_err(torch_out, ref) < 2e-2 and rel_err(triton_out, ref) < 2e-2
    assert rel_err(triton_out, torch_out) < 2e-2


def test_nf4_storage_is_bitsandbytes_own():
    """The engine's NF4-DQ dequantization equals bitsandbytes' on the same bytes."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(96, 320).bfloat16() * 0.02
    q = W.quantize(w, W.NF4_DQ)
    assert torch.equal(q.dequantize(), bnbf.dequantize_4bit(q.data.view(-1, 1), q.state))
    # nibbles; one absmax byte per 64 weights (480 blocks); one fp32 scale per 256 blocks (2)
    assert q.nbytes == 96 * 320 // 2 + 480 + 2 * 4


def test_rmsnorm_rope_and_cache_writes_agree():
    # Seeded: two bf16 roundings of a rotation by random (unnormalised) tables differ by up to 8.4e-3 in
    # 1 of 300 draws, so the draw must not depend on which tests ran before.
    torch.manual_seed(0)
    x, w = torch.randn(5, 96).bfloat16(), torch.randn(96).bfloat16()
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)) * w.double()
    assert rel_err(TritonOps.rmsnorm(x, w, 1e-5, poisoned(5, 96)), ref) < 8e-3
    heads, kv_heads, d, s_max = 4, 2, 32, 24
    cos, sin = torch.randn(s_max, d // 2).bfloat16(), torch.randn(s_max, d // 2).bfloat16()
    qkv = torch.randn(3, (heads + 2 * kv_heads) * d).bfloat16()
    pos, slots = torch.tensor([3, 9, 0], dtype=torch.int32), torch.tensor([1, 0, 1], dtype=torch.int32)
    out = {}
    for ops in OPS:
        k, v = torch.zeros(2, kv_heads, s_max, d).bfloat16(), torch.zeros(2, kv_heads, s_max, d).bfloat16()
        out[ops.name] = (ops.rope_cache(qkv, pos, slots, cos, sin, k, v, heads, kv_heads, poisoned(3, heads, d)), k, v)
    for a, b in zip(out["torch"], out["triton"]):
        assert rel_err(a, b) < 8e-3
    # values are copied, not rotated: slot 1, position 3 holds token 0's value heads
    assert torch.equal(out["triton"][2][1, :, 3], qkv[0, (heads + kv_heads) * d:].view(kv_heads, d))


def test_qwen3_qk_norm_in_the_rope_kernel_matches_torch_and_float64():
    """Qwen 3's q_norm and k_norm, fused into the RoPE kernel: each query and key head RMS-normed over its
    channels and scaled by its weight before the rotation; values untouched."""
    torch.manual_seed(0)
    heads, kv_heads, d, s_max = 4, 2, 32, 24
    angles = torch.arange(s_max)[:, None] * 10000.0 ** (-torch.arange(d // 2) / (d // 2))
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    qkv = torch.randn(3, (heads + 2 * kv_heads) * d).bfloat16()
    norms = (1 + 0.1 * torch.randn(d)).bfloat16(), (1 + 0.1 * torch.randn(d)).bfloat16()  # weights as trained
    pos, slots = torch.tensor([3, 9, 0], dtype=torch.int32), torch.tensor([1, 0, 1], dtype=torch.int32)
    x = qkv.view(3, heads + 2 * kv_heads, d).double()
    normed = x.clone()
    for part, w in zip((slice(0, heads), slice(heads, heads + kv_heads)), norms):
        h = x[:, part]
        normed[:, part] = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    c = torch.cat([cos, cos], -1).double()[pos.long()][:, None]
    s = torch.cat([sin, sin], -1).double()[pos.long()][:, None]
    qk = normed[:, :heads + kv_heads]
    rotated = qk * c + torch.cat([-qk[..., d // 2:], qk[..., :d // 2]], -1) * s
    out = {}
    for ops in OPS:
        k, v = torch.zeros(2, kv_heads, s_max, d).bfloat16(), torch.zeros(2, kv_heads, s_max, d).bfloat16()
        q = ops.rope_cache(qkv, pos, slots, cos, sin, k, v, heads, kv_heads, poisoned(3, heads, d), norms, 1e-6)
        out[ops.name] = (q, k[slots.long(), :, pos.long()], v[slots.long(), :, pos.long()])
        assert rel_err(q, rotated[:, :heads]) < 1e-2 and rel_err(out[ops.name][1], rotated[:, heads:]) < 1e-2
        assert torch.equal(out[ops.name][2], qkv.view(3, -1, d)[:, heads + kv_heads:])
    # Each within 1% of float64; between them, the norm's bf16 rounding before the rotation's three (an rsqrt
    # a last bit apart moves a product across a rounding boundary) adds a few tenths of a percent.
    for a, b in zip(out["torch"], out["triton"]):
        assert rel_err(a, b) < 1.2e-2


@pytest.mark.parametrize("window", [0, 6])
def test_decode_attention_matches_float64(window):
    b, heads, kv_heads, d, s_max = 3, 8, 2, 32, 40
    k, v = torch.randn(b, kv_heads, s_max, d).bfloat16(), torch.randn(b, kv_heads, s_max, d).bfloat16()
    q = torch.randn(b, heads, d).bfloat16()
    seq_len = torch.tensor([4, 21, 39], dtype=torch.int32)
    ref = torch.empty(b, heads, d, dtype=torch.float64)
    for i in range(b):  # by hand: the new token sees positions [lo, seq_len] of its own sequence
        hi = int(seq_len[i]) + 1
        lo = max(0, hi - window) if window else 0
        for h in range(heads):
            kk, vv = k[i, h // 4, lo:hi].double(), v[i, h // 4, lo:hi].double()
            ref[i, h] = torch.softmax(kk @ q[i, h].double() / d ** 0.5, 0) @ vv
    got = TritonOps.decode_attention(q, k, v, seq_len, d ** -0.5, window, poisoned(b, heads * d),
                                     attention_scratch(b, heads, d, 4, "cpu"))
    assert rel_err(got, ref.view(b, -1)) < 8e-3
    assert rel_err(TorchOps.decode_attention(q, k, v, seq_len, d ** -0.5, window, poisoned(b, heads * d)),
                   ref.view(b, -1)) < 8e-3


QUANT_CONFIGS = {
    "bf16": None,
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {f: save_runnable_checkpoint(root / f, f) for f in ("llama", "mistral", "qwen2", "qwen3")}


def _load(folder, quant):
    qc = QUANT_CONFIGS[quant]
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                quantization_config=BitsAndBytesConfig(**qc) if qc else None).eval()


def _assert_same_or_tie(reference, prompt: torch.Tensor, got: list[int], expected: list[int]) -> None:
    """Equal token for token, except where the reference's own top two logits tie in bf16 (argmax then
    picks either): there the engine's token must be one of the tied ones."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            with torch.no_grad():
                logits = reference(torch.cat([prompt, torch.tensor([expected[:i]], dtype=torch.long)], dim=1)
                                   ).logits[0, -1].float()
            assert logits[a] >= logits[b] - 1e-2 * logits.abs().max(), f"step {i}: {a} vs {b}, not a tie"
            return


def _greedy(engine: Engine, prompt: list[int], n: int, slot: int = 0) -> list[int]:
    token = engine.prefill(prompt, slot=slot).argmax(-1)
    out = []
    for _ in range(n):
        out.append(int(token))
        token = engine.decode(token).argmax(-1)
    return out


# The Triton interpreter is slow: it runs each family once; the torch path runs every precision.
ENGINE_CASES = ([(f, q, "torch") for f in ("llama", "mistral", "qwen2", "qwen3") for q in sorted(QUANT_CONFIGS)]
                + [("llama", "nf4-dq", "triton"), ("qwen2", "bf16", "triton"), ("mistral", "fp4", "triton"),
                   ("qwen3", "bf16", "triton"), ("qwen3", "nf4-dq", "triton")])


@pytest.mark.parametrize("family,quant,ops", ENGINE_CASES)
def test_engine_greedy_equals_transformers_generate(checkpoints, family, quant, ops, monkeypatch):
    """Token for token, on the same quantized weights; prefill chunks of 8 tokens exercise the cache."""
    monkeypatch.setattr("heavylift.engine.model.PREFILL_CHUNK_TOKENS", 8)
    reference = _load(checkpoints[family], quant)
    # Built before transformers' first forward: bitsandbytes' CPU kernel repacks 4-bit weights on it.
    engine = Engine.from_model(_load(checkpoints[family], quant), batch=2, context=64, ops=ops)
    prompt = torch.randint(3, 320, (1, 19), generator=torch.Generator().manual_seed(5))
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 19:].tolist()
    _assert_same_or_tie(reference, prompt, _greedy(engine, prompt[0].tolist(), 8), expected)
    with torch.no_grad():
        ref_logits = reference(prompt).logits[0, -1].float()
    logits = engine.prefill(prompt[0].tolist())[0]
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()


def test_mistral_sliding_window_is_honoured(tmp_path, monkeypatch):
    """A window of 8 over a 30-token prompt: the engine must drop what transformers drops."""
    monkeypatch.setattr("heavylift.engine.model.PREFILL_CHUNK_TOKENS", 8)
    folder = save_runnable_checkpoint(tmp_path / "m", "mistral")
    import json

    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    reference = _load(folder, "bf16")
    engine = Engine.from_model(_load(folder, "bf16"), batch=1, context=64, ops="triton")
    prompt = torch.randint(3, 320, (1, 30), generator=torch.Generator().manual_seed(6))
    expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 30:].tolist()
    assert _greedy(engine, prompt[0].tolist(), 6) == expected


@pytest.mark.parametrize("quant", ["bf16", "nf4-dq"])
def test_a_device_taking_each_chunk_a_few_tokens_at_a_time_prefills_the_same_sequence(checkpoints, quant,
                                                                                     monkeypatch):
    """Engine.prefill_rows (a device whose plan fits fewer tokens of a chunk at a time): chunks of 8 through the
    layers 3 tokens at a time write the cache and give the logits of whole chunks, to within the rounding of
    smaller matmuls; the greedy continuation is the same."""
    monkeypatch.setattr("heavylift.engine.model.PREFILL_CHUNK_TOKENS", 8)
    model = _load(checkpoints["llama"], quant)
    whole = Engine.from_model(model, batch=1, context=64, ops="torch")
    passes = Engine.from_model(model, batch=1, context=64, ops="torch", prefill_rows={torch.device("cpu"): 3})
    seen = []  # the tokens each layer call of `passes` took

    def layer(layer, hidden, *args):
        seen.append(len(hidden))
        return Engine._prefill_layer(passes, layer, hidden, *args)

    passes._prefill_layer = layer
    prompt = torch.randint(3, 320, (19,), generator=torch.Generator().manual_seed(7)).tolist()
    a, b = whole.prefill(prompt), passes.prefill(prompt)
    assert seen == [n for n in (3, 3, 2, 3, 3, 2, 3) for _ in whole.layers]  # chunks of 8, 8 and 3
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    for x, y in zip(whole.layers, passes.layers):
        assert torch.allclose(x.k_cache.float(), y.k_cache.float(), atol=0.05, rtol=0.02)
    assert _greedy(whole, prompt, 6) == _greedy(passes, prompt, 6)


def test_batch_decode_keeps_sequences_apart(checkpoints):
    """Two sequences decoded together give what each gives alone."""
    engine = Engine.from_model(_load(checkpoints["llama"], "nf4-dq"), batch=2, context=64, ops="triton")
    a, b = list(range(5, 17)), list(range(40, 49))
    alone = [_greedy(engine, a, 5), _greedy(engine, b, 5)]
    first = torch.cat([engine.prefill(a, slot=0), engine.prefill(b, slot=1)]).argmax(-1)
    together, token = [], first
    for _ in range(5):
        together.append(token.tolist())
        token = engine.decode(token).argmax(-1)
    assert [t[0] for t in together] == alone[0] and [t[1] for t in together] == alone[1]
    assert engine.lengths() == [len(a) + 5, len(b) + 5]


def test_engine_from_random_builds_quantized_storage():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320)
    engine = Engine.from_random(config, W.NF4_DQ, "cpu", batch=1, context=32, ops="torch")
    # per layer: q 128x128, k and v 64x128, o 128x128, gate and up 256x128, down 128x256, in NF4-DQ;
    # then the bf16 lm_head 320x128
    elements = 128 * 128 * 2 + 64 * 128 * 2 + 256 * 128 * 3
    # nibbles, absmax bytes, and one fp32 scale per 256 blocks: 1 each for q, k, v, o (256 or 128 blocks),
    # 2 each for gate, up, down (512 blocks)
    per_layer = elements // 2 + elements // 64 + 10 * 4
    assert engine.weight_bytes == 2 * per_layer + 320 * 128 * 2
    assert len(_greedy(engine, [1, 2, 3], 4)) == 4


def test_unsupported_models_fall_back_with_a_reason():
    from transformers import AutoConfig

    for family, expect in (("gemma2", "not gemma2"), ("phi3", "not phi3"), ("mixtral", "not mixtral")):
        config = AutoConfig.for_model(**TINY_FAMILIES[family])
        assert expect in unsupported_reason(config, "bf16", [torch.device("cuda", 0)])
    llama = AutoConfig.for_model(**TINY_FAMILIES["llama"])
    assert "CUDA GPU" in unsupported_reason(llama, "nf4", [torch.device("cpu")])
    assert "bf16" in unsupported_reason(llama, "fp16", [torch.device("cuda", 0)])
    assert unsupported_reason(llama, "nf4", [torch.device("cuda", 0)]) is None


def test_session_engine_choice(checkpoints):
    auto = heavylift.load(str(checkpoints["llama"]), quant="nf4-dq", context=128)
    assert auto.engine is None and "CUDA GPU" in auto.engine_note  # the CPU: transformers, and why
    fast = heavylift.load(str(checkpoints["llama"]), quant="nf4-dq", context=128, engine="fast")
    assert fast.engine is not None  # asked for: the engine's reference path runs on the CPU
    greedy = dict(max_new_tokens=6, temperature=0)
    assert fast.generate("the quick brown fox", **greedy).token_ids == auto.generate("the quick brown fox",
                                                                                        **greedy).token_ids
    with pytest.raises(InvalidArgumentError, match="--engine transformers"):
        heavylift.load(str(save_runnable_checkpoint(checkpoints["llama"].parent / "g", "gemma2")), quant="bf16",
                       context=128, engine="fast")


def test_cli_engine_flag(checkpoints, capsys):
    code, out, err = run_cli(capsys, "run", str(checkpoints["llama"]), "--prompt", "hi", "--max-new-tokens", "3",
                             "--temperature", "0", "--quant", "bf16", "--context", "64", "--engine", "warp")
    assert code == 2 and "--engine must be one of auto, fast, transformers" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "bench", str(checkpoints["llama"]), "--quant", "nf4-dq")
    assert code == 2 and "no CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_register_lookup_matches_the_code_table_for_every_byte(quant_type):
    """The PTX lookup (lut.py), run step by step in Python, against bitsandbytes' table for all 256 bytes."""
    import struct

    import bitsandbytes.functional as bnbf

    from heavylift.engine import lut

    code = bnbf.get_4bit_type(quant_type, device="cpu").tolist()
    as_f16 = [struct.unpack("<e", struct.pack("<e", v))[0] for v in code]
    for first in range(0, 256, 4):
        packed = bytes(range(first, first + 4))
        want = [as_f16[n] for byte in packed for n in (byte >> 4, byte & 15)]
        assert lut.emulate(code, int.from_bytes(packed, "little")) == want
    assert max(abs(a - b) / max(abs(a), 1e-3) for a, b in zip(code, as_f16)) < 2 ** -11


def test_register_lookup_takes_its_table_as_operands_in_the_order_the_kernels_pass_them():
    """kernels pass lut.words() as eight int32 tensors under pack=4 ($9, $13, ... $37); with those in place of
    the operands the PTX is the immediate-table program line for line."""
    import re

    import bitsandbytes.functional as bnbf

    from heavylift.engine import lut

    code = bnbf.get_4bit_type("nf4", device="cpu").tolist()
    with_operands = lut.ptx(code, table_operands=True)
    assert not re.search(r"mov\.b32 [lh]\d", with_operands)
    assert sorted({int(n) for n in re.findall(r"\$(\d+)", with_operands) if int(n) > 8}) == [9 + 4 * j for j in range(8)]
    for j, name in enumerate([f"l{i}" for i in range(4)] + [f"h{i}" for i in range(4)]):
        with_operands = re.sub(rf"\${9 + 4 * j}\b", name, with_operands)

    def body(text):
        return [line for line in text.splitlines() if not line.startswith((".reg", "mov.b32 l", "mov.b32 h"))]

    assert body(with_operands) == body(lut.ptx(code))
    low, high = lut.table_words(code)
    assert [w & lut.MASK32 for w in lut.words(code)] == low + high
    assert all(-2 ** 31 <= w < 2 ** 31 for w in lut.words(code))


def test_fused_lookup_and_fp16_dot_matches_the_products_for_every_byte():
    """lut.dot_program (gemv4's inner step), run step by step in Python: every byte value in every position of
    a packed word, against the exact sum of its eight products; the error is fp16 rounding, a few 2^-11 of the
    products' magnitude, and each weight meets its own x (first weight, high nibble, with the even element)."""
    import random
    import struct

    from heavylift.engine import lut
    from heavylift.engine.kernels import nf4_code

    code = nf4_code()
    f16 = lambda v: struct.unpack("<e", struct.pack("<e", v))[0]  # noqa: E731
    bits = lambda v: struct.unpack("<H", struct.pack("<e", v))[0]  # noqa: E731
    rng = random.Random(3)
    for first in range(0, 256, 4):
        packed = bytes((first + i * 67) % 256 for i in range(4))
        xs = [f16(rng.uniform(-4, 4)) for _ in range(8)]
        pairs = [bits(xs[2 * i]) | bits(xs[2 * i + 1]) << 16 for i in range(4)]
        products = [f16(code[b >> 4]) * xs[2 * i] for i, b in enumerate(packed)] + \
                   [f16(code[b & 15]) * xs[2 * i + 1] for i, b in enumerate(packed)]
        got = lut.emulate_dot(code, int.from_bytes(packed, "little"), pairs)
        assert abs(got - sum(products)) <= 4 * 2 ** -11 * sum(abs(p) for p in products) + 1e-7


def test_shared_memory_lookup_gives_the_register_lookups_bits_for_every_byte_and_lane():
    """lut.smem_dot_program (one table load per byte, addressed by a single prmt) against lut.dot_program:
    the same pairs meet the same x in the same order, so every lane's sum is the same float, bit for bit;
    and each prmt address lands in the lane's own column of the entry the byte names."""
    import random
    import struct

    from heavylift.engine import lut
    from heavylift.engine.kernels import nf4_code

    code = nf4_code()
    bits = lambda v: struct.unpack("<H", struct.pack("<e", v))[0]  # noqa: E731
    rng = random.Random(5)
    for first in range(256):
        packed = bytes((first + i * 89) % 256 for i in range(4))
        word = int.from_bytes(packed, "little")
        pairs = [bits(rng.uniform(-4, 4)) | bits(rng.uniform(-4, 4)) << 16 for _ in range(4)]
        lane = rng.randrange(32)
        assert lut.emulate_dot(code, word, pairs, smem=True, lane=lane) == lut.emulate_dot(code, word, pairs)
        for j, select in enumerate(lut.ADDRESS_SELECT):
            assert lut._prmt(word, 4 * lane, select) == 256 * packed[j] + 4 * lane
    assert lut.pair_words(code)[0x4F] & 0xFFFF == bits(code[4]) and lut.pair_words(code)[0x4F] >> 16 & 0xFFFF == \
        bits(code[15])


def test_planes_put_each_pair_where_gemv4_reads_it():
    from heavylift.engine.ops import planes
    from heavylift.engine.weights import X16_SCALE

    k = 64
    y = torch.randn(1, k).bfloat16()
    words = planes(y)
    halves = words.view(torch.float16).view(4, k // 8, 2)  # [plane j, word g, element of the pair]
    for j in range(4):
        for g in range(k // 8):
            for e in range(2):
                assert halves[j, g, e].item() == pytest.approx(y[0, 8 * g + 2 * j + e].item() * X16_SCALE, rel=2 ** -10)


def test_gemv4_kernels_compile_for_sm90_with_one_table_load_a_byte(tmp_path):
    """gemv4's Gluon kernels at the engine's tile, compiled for sm_90 without a GPU: in the main loop each packed
    byte costs one prmt (its address in the lane's column of the byte table) and one ld.shared (its pair of
    weights), about six instructions a byte all told. In a process of its own without Triton's interpreter and
    with an empty Triton cache (conftest.compile_apart)."""
    code = ("import json; from batched_sass import compile_gemv4; "
            "print(json.dumps([compile_gemv4(form) for form in ('linear', 'glu')]))")
    for rec in compile_apart(code, tmp_path):
        ops = rec["loop_ops"]
        assert ops["LDS"] == ops["PRMT"] == rec["bytes_per_thread"], rec
        assert rec["instructions_per_byte"] <= 7 and rec["shared_bytes"] == 64 * 1024, rec


def test_producers_write_the_planes_of_what_they_write():
    """rmsnorm and the attention's last pass write one token's fp16 planes beside it (Triton's interpreter),
    exactly as ops.planes makes them from the bf16 output; TorchOps does the same for the GLU."""
    from heavylift.engine.ops import planes

    x, w = torch.randn(1, 96).bfloat16(), torch.randn(96).bfloat16()
    out16 = torch.full((48,), -1, dtype=torch.int32)
    out = TritonOps.rmsnorm(x, w, 1e-5, poisoned(1, 96), out16)
    assert torch.equal(out16, planes(out))
    b, heads, kv_heads, d, s_max = 1, 8, 2, 32, 40
    k, v = torch.randn(b, kv_heads, s_max, d).bfloat16(), torch.randn(b, kv_heads, s_max, d).bfloat16()
    q, seq_len = torch.randn(b, heads, d).bfloat16(), torch.tensor([17], dtype=torch.int32)
    attn16 = torch.full((heads * d // 2,), -1, dtype=torch.int32)
    got = TritonOps.decode_attention(q, k, v, seq_len, d ** -0.5, 0, poisoned(b, heads * d),
                                     attention_scratch(b, heads, d, 4, "cpu"), attn16)
    assert torch.equal(attn16, planes(got))
    gate, up = (W.quantize(torch.randn(64, 96) * 0.05, W.NF4_DQ) for _ in range(2))
    act16 = torch.full((32,), -1, dtype=torch.int32)
    act = TorchOps.glu(x, gate, up, poisoned(1, 64), out16=act16)
    assert torch.equal(act16, planes(act))


@pytest.mark.parametrize("model", ["llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma2-9b", "phi3-mini", "mixtral-8x7b",
                                   "qwen3-8b", "qwen3-235b-a22b", "gemma3-27b", "gpt-oss-20b"])
def test_the_planner_and_the_engine_agree_on_what_the_engine_runs(model):
    # The planner decides from config.json (runtimes.model_reason); the engine from transformers' config object.
    from transformers import AutoConfig

    from heavylift.planner import runtimes
    from heavylift.model.catalog import find_model
    from heavylift.engine import model_reason

    config = find_model(model).config_dict()
    for quant in ("bf16", "fp16", "fp8", "nf4-dq"):
        assert runtimes.model_reason(config, quant) == model_reason(AutoConfig.for_model(**config), quant)
