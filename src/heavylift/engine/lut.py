"""The 4-bit code-table lookup as register arithmetic: PTX for the kernels, and a model of it for tests.

Why not a table in memory: a load per nibble from a 16-entry table is a gather, which Triton gives the
worst register layout (one element per thread) and so forces every other tile of the GEMV through
shared memory each step; on an H100 that held the NF4 GEMV near 0.6 TB/s. `prmt` looks up four
nibbles at once among eight bytes held in registers, so the table costs no memory traffic at all.

The 16 values are kept as fp16 (11 significant bits; every NF4 and FP4 code value is a normal fp16
or zero, and the rounding is 2^-12 relative, well under the bf16 rounding of the weight the reference
dequantizes to). Eight words hold them: the low bytes of entries 0-3, 4-7, 8-11, 12-15, then the high
bytes. Per four packed bytes (eight nibbles), two `prmt` look up entries 0-7 and 8-15 of each byte
table, `lop3` keeps per byte the half the nibble's top bit names (its mask comes from `prmt`'s
sign-replicate mode), and a last `prmt` pairs low and high bytes into fp16 values.
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence

MASK32 = 0xFFFFFFFF
# Selectors of prmt's sign-replicate mode: output byte i = 0xFF where the top bit of nibble i of the
# packed half is set. Operands (q << 4, q): bit 3 of an even nibble sits at bit 7 of a byte of q << 4,
# bit 3 of an odd nibble at bit 7 of a byte of q.
TOP_BIT_SELECT = (0xD9C8, 0xFBEA)  # nibbles of bytes 0-1, of bytes 2-3
PAIR_SELECT = (0x5140, 0x7362)  # (low table byte, high table byte) of nibbles 0-1, of nibbles 2-3
# The same pairs in x's order: low half the high nibble (a byte's first weight, x's even element).
PAIR_SELECT_X = (0x4051, 0x6273)
SELECT_HIGH = 0xD8  # lop3 truth table of (a & ~c) | (b & c)


def _f16_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]


def _bf16_bits(value: float) -> int:
    """value rounded to bf16 (nearest, ties to even, through float32 as torch rounds), as its bit pattern."""
    f32 = struct.unpack("<I", struct.pack("<f", value))[0]
    return (f32 + 0x7FFF + (f32 >> 16 & 1)) >> 16 & 0xFFFF


def _bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


HALVES = {"fp16": _f16_bits, "bf16": _bf16_bits}  # the 16-bit formats a table may hold its values in


def _code_bits(code: Sequence[float], half: str = "fp16") -> list[int]:
    """The 16 code values as fp16 (or bf16) bit patterns."""
    bits = [HALVES[half](float(v)) for v in code]
    if len(bits) != 16:
        raise ValueError(f"a 4-bit code has 16 values, not {len(bits)}")
    return bits


def _signed(words: Iterable[int]) -> list[int]:
    """32-bit words as the signed int32 values a torch.int32 tensor holds."""
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def table_words(code: Sequence[float], half: str = "fp16") -> tuple[list[int], list[int]]:
    """The low-byte and high-byte words of the fp16 (or bf16) table, four entries per word."""
    bits = _code_bits(code, half)
    low = [sum((bits[4 * w + i] & 0xFF) << (8 * i) for i in range(4)) for w in range(4)]
    high = [sum((bits[4 * w + i] >> 8) << (8 * i) for i in range(4)) for w in range(4)]
    return low, high


def program(code: Sequence[float]) -> list[tuple]:
    """The lookup as (op, destination, operands...) steps; `ptx` renders them, `emulate` runs them.

    Registers: q the four packed bytes; outputs o0-o3 the high nibbles of bytes 0-3 (the first
    weight of each byte, as bitsandbytes packs), o4-o7 the low nibbles.
    """
    low, high = table_words(code)
    steps = [("mov", f"l{i}", low[i]) for i in range(4)] + [("mov", f"h{i}", high[i]) for i in range(4)]
    steps.append(("shl", "q4", "q", 4))
    for half in range(2):
        steps += _lookup_half(half)
        for byte in range(2):
            out = 2 * half + byte
            steps += [("prmt", "t", "ls", "hs", PAIR_SELECT[byte]), ("f16pair", f"o{out}", f"o{out + 4}", "t")]
    return steps


def _lookup_half(half: int) -> list[tuple]:
    """Steps that look the four nibbles of bytes 2 half, 2 half + 1 up: their table entries' low bytes in
    ls and high bytes in hs (q4 = q << 4 already set)."""
    steps = [("shr", "c", "q", 16 * half), ("and", "c", "c", 0x7777), ("prmt", "m", "q4", "q", TOP_BIT_SELECT[half])]
    for table, dst in (("l", "ls"), ("h", "hs")):
        steps += [("prmt", "x", f"{table}0", f"{table}1", "c"), ("prmt", "y", f"{table}2", f"{table}3", "c"),
                  ("lop3", dst, "x", "y", "m", SELECT_HIGH)]
    return steps


def dot_program(code: Sequence[float]) -> list[tuple]:
    """The lookup fused with its multiply: four packed bytes against the fp16 pairs of x they meet.

    Registers: q the four packed bytes, x0-x3 per byte the fp16 pair (even, odd element) of x, l0-l3 and
    h0-h3 the table words; s the float32 sum of the eight products. Each byte's looked-up pair meets its
    x pair in one fp16x2 fused multiply-add, and the two halves of the sum are added once at the end:
    a third of the instructions of looking up into float32 and multiplying there (lut.program).
    """
    steps = [("shl", "q4", "q", 4)]
    for half in range(2):
        steps += _lookup_half(half)
        for byte in range(2):
            first = half == 0 and byte == 0
            steps += [("prmt", "t", "ls", "hs", PAIR_SELECT_X[byte]),
                      ("hfma", "acc", "t", f"x{2 * half + byte}", None if first else "acc")]
    return steps + [("hsum", "s", "acc")]


# prmt selectors pairing two bytes' looked-up values (ls, hs as _lookup_half leaves them): the first weights
# (high nibbles) of bytes 2 half and 2 half + 1 in the low and high halves, then their second weights.
FIRST_PAIR_SELECT, SECOND_PAIR_SELECT = 0x7351, 0x6240
NEG_ZERO_PAIR = 0x80008000  # bf16x2 -0.0: the addend that makes fma a rounded multiply


def scaled_pairs_program() -> list[tuple]:
    """Four packed bytes to their eight weights in bf16, each times its byte's scale: the batched kernel's
    decode (batched_tiles.py). The table words hold bf16 values (table_words(code, "bf16")).

    Registers: q the four packed bytes; s0 the bf16 scales of bytes 0 and 1, s1 of bytes 2 and 3; outputs
    f0, f1 the first weights (high nibbles) of bytes 0-1 and 2-3 as bf16 pairs, g0, g1 the second weights.
    Per pair one fma.rn.bf16x2 with -0: the product rounded once. About seven instructions a byte.
    """
    steps = [("mov", "z", NEG_ZERO_PAIR), ("shl", "q4", "q", 4)]
    for half in range(2):
        steps += _lookup_half(half)
        steps += [("prmt", "t", "ls", "hs", FIRST_PAIR_SELECT), ("bfma", f"f{half}", "t", f"s{half}", "z"),
                  ("prmt", "t", "ls", "hs", SECOND_PAIR_SELECT), ("bfma", f"g{half}", "t", f"s{half}", "z")]
    return steps


def scaled_pairs_ptx() -> str:
    """Inline PTX of `scaled_pairs_program` for `inline_asm_elementwise(pack=4)` with two bf16 outputs (two
    registers each: $0-$1 the first weights, $2-$3 the second), then the packed bytes ($4), the bf16 scales
    ($5-$6) and the eight int32 table words, four operands each ($7, $11, ... $35 hold them)."""
    regs = {"f0": "$0", "f1": "$1", "g0": "$2", "g1": "$3", "q": "$4", "s0": "$5", "s1": "$6"}
    regs |= {f"{t}{i}": f"${7 + 4 * (4 * k + i)}" for k, t in enumerate("lh") for i in range(4)}
    return _render(scaled_pairs_program(), regs, ["z, q4, c, x, y, m, ls, hs, t", "lo, hi"])


def pairs_program() -> list[tuple]:
    """`scaled_pairs_program` without the scale: four packed bytes to their eight code values in bf16, for the
    batched kernel that multiplies each 64-weight block's partial product by its absmax instead (POST,
    batched_tiles.py). Registers and outputs as there, the table words holding bf16 values."""
    steps = [("shl", "q4", "q", 4)]
    for half in range(2):
        steps += _lookup_half(half)
        steps += [("prmt", f"f{half}", "ls", "hs", FIRST_PAIR_SELECT),
                  ("prmt", f"g{half}", "ls", "hs", SECOND_PAIR_SELECT)]
    return steps


def pairs_ptx() -> str:
    """Inline PTX of `pairs_program` for `inline_asm_elementwise(pack=4)` with two bf16 outputs ($0-$1 the first
    weights, $2-$3 the second), the packed bytes ($4) and the eight int32 table words, four operands each ($5,
    $9, ... $33 hold them)."""
    regs = {"f0": "$0", "f1": "$1", "g0": "$2", "g1": "$3", "q": "$4"}
    regs |= {f"{t}{i}": f"${5 + 4 * (4 * k + i)}" for k, t in enumerate("lh") for i in range(4)}
    return _render(pairs_program(), regs, ["q4, c, x, y, m, ls, hs", "lo, hi"])


def emulate_pairs(code: Sequence[float], packed: int) -> list[float]:
    """The eight code values `pairs_ptx` produces for four packed bytes, in weight order (byte 0 high nibble
    first)."""
    low, high = table_words(code, "bf16")
    r = {"q": packed & MASK32} | {f"l{i}": low[i] for i in range(4)} | {f"h{i}": high[i] for i in range(4)}
    for op, dst, *src in pairs_program():
        _step(r, op, dst, src)
    first = [_bf16(r[f"f{i // 2}"] >> 16 * (i % 2)) for i in range(4)]
    second = [_bf16(r[f"g{i // 2}"] >> 16 * (i % 2)) for i in range(4)]
    return [v for byte in range(4) for v in (first[byte], second[byte])]


def emulate_scaled_pairs(code: Sequence[float], packed: int, scales: Sequence[float]) -> list[float]:
    """The eight weights `scaled_pairs_ptx` produces for four packed bytes and their four scales (rounded to
    bf16 first, as the kernel passes them), in weight order (byte 0 high nibble first)."""
    low, high = table_words(code, "bf16")
    r = {"q": packed & MASK32} | {f"l{i}": low[i] for i in range(4)} | {f"h{i}": high[i] for i in range(4)}
    s = [_bf16_bits(v) for v in scales]
    r |= {"s0": s[0] | s[1] << 16, "s1": s[2] | s[3] << 16}
    for op, dst, *src in scaled_pairs_program():
        if op == "bfma":
            a, b = r[src[0]], r[src[1]]
            r[dst] = sum(_bf16_bits(_bf16(a >> sh) * _bf16(b >> sh)) << sh for sh in (0, 16))
        else:
            _step(r, op, dst, src)
    first = [_bf16(r[f"f{i // 2}"] >> 16 * (i % 2)) for i in range(4)]
    second = [_bf16(r[f"g{i // 2}"] >> 16 * (i % 2)) for i in range(4)]
    return [v for byte in range(4) for v in (first[byte], second[byte])]


def pair_words(code: Sequence[float], half: str = "fp16") -> list[int]:
    """The byte table of `smem_dot_program` (fp16) and `smem_pairs_program` (bf16): entry b the pair a packed
    byte b stands for, in x's order (low half the high nibble's value, the byte's first weight), as signed
    int32."""
    bits = _code_bits(code, half)
    return _signed(bits[b >> 4] | bits[b & 15] << 16 for b in range(256))


# prmt selectors building a byte table address from byte j of q: output byte 0 the lane's column (byte 0 of
# the second operand, lane * 4), byte 1 byte j of q, bytes 2-3 zero (the second operand's byte 1).
ADDRESS_SELECT = tuple(0x5504 | j << 4 for j in range(4))


def smem_dot_program() -> list[tuple]:
    """`dot_program` with the lookup in shared memory: one load per packed byte from a 256-entry table of
    fp16 pairs (pair_words) instead of eight register operations per two bytes, so about three
    instructions a byte (prmt, ld.shared, fp16x2 FMA) where the register lookup spends seven.

    The table sits at byte offset 256 b + 4 lane for entry b: a copy per lane, each in its own bank, so
    the 32 lanes' loads never conflict, and one prmt turns a packed byte into its address. Registers: q,
    x0-x3 and s as in dot_program; `lane` = 4 x lane id. The products and their order are dot_program's,
    so the two give the same bits.
    """
    steps = []
    for byte in range(4):
        steps += [("prmt", "a", "q", "lane", ADDRESS_SELECT[byte]), ("lds", "t", "a"),
                  ("hfma", "acc", "t", f"x{byte}", None if byte == 0 else "acc")]
    return steps + [("hsum", "s", "acc")]


def smem_dot_ptx() -> str:
    """Inline PTX of `smem_dot_program` for `inline_asm_elementwise(pack=1)`: $0 the float32 sum, $1 the
    packed word, $2-$5 the x pairs, $6 the lane's column (4 x lane id); the table at the start of the
    kernel's shared memory (`global_smem`, where Triton puts its first allocation)."""
    regs = {"s": "$0", "q": "$1", "lane": "$6"} | {f"x{i}": f"${2 + i}" for i in range(4)}
    return _render([("mov", "base", "global_smem")] + smem_dot_program(), regs, ["a, t, acc, base", "lo, hi, sh"])


def smem_pairs_program(scaled: bool) -> list[tuple]:
    """Four packed bytes to their four bf16 pairs (low half the byte's first weight, its high nibble) from the
    bf16 byte table in shared memory, laid out as `smem_dot_program`'s: a prmt and an ld.shared a byte (the
    Hopper wgmma kernel's decode, wgmma4.py). `scaled`: each pair times s, the bf16 pair of its block's
    absmax, with one fma.rn.bf16x2 and -0 (the product rounded once).

    Registers: q the four packed bytes, `lane` 4 x the lane id, s the scale pair; outputs o0-o3 per byte."""
    steps = [("mov", "base", "global_smem")] + ([("mov", "z", NEG_ZERO_PAIR)] if scaled else [])
    for byte in range(4):
        steps += [("prmt", "a", "q", "lane", ADDRESS_SELECT[byte]), ("lds", f"o{byte}", "a")]
        if scaled:
            steps.append(("bfma", f"o{byte}", f"o{byte}", "s", "z"))
    return steps


def smem_pairs_ptx(scaled: bool) -> str:
    """Inline PTX of `smem_pairs_program` for `inline_asm_elementwise(pack=1)`: four int32 outputs ($0-$3, the
    pairs of bytes 0-3), the packed word ($4), the lane column ($5), the scale pair ($6)."""
    regs = {f"o{i}": f"${i}" for i in range(4)} | {"q": "$4", "lane": "$5", "s": "$6"}
    return _render(smem_pairs_program(scaled), regs, ["a, base, z", "lo, hi"])


def emulate_smem_pairs(code: Sequence[float], packed: int, lane: int = 0, scale: float | None = None) -> list[float]:
    """The eight weights `smem_pairs_ptx` produces for four packed bytes (as lane `lane`; times `scale`, rounded
    to bf16 first as the kernel passes it, where given), in weight order (byte 0 high nibble first)."""
    table = {256 * b + 4 * col: w & MASK32 for b, w in enumerate(pair_words(code, "bf16")) for col in range(32)}
    s = 0 if scale is None else _bf16_bits(scale)
    r = {"q": packed & MASK32, "lane": 4 * lane, "s": s | s << 16}
    for op, dst, *src in smem_pairs_program(scale is not None):
        if op == "lds":
            r[dst] = table[r[src[0]]]
        elif op == "bfma":
            a, b = r[src[0]], r[src[1]]
            r[dst] = sum(_bf16_bits(_bf16(a >> sh) * _bf16(b >> sh)) << sh for sh in (0, 16))
        elif op == "mov" and dst == "base":
            r[dst] = 0
        else:
            _step(r, op, dst, src)
    return [_bf16(r[f"o{byte}"] >> sh) for byte in range(4) for sh in (0, 16)]


def dot_ptx(code: Sequence[float]) -> str:
    """Inline PTX of `dot_program` for `inline_asm_elementwise(pack=1)`: $0 the float32 sum, $1 the packed
    word, $2-$5 the x pairs, $6-$13 the table words (lut.words)."""
    regs = {"s": "$0", "q": "$1"} | {f"x{i}": f"${2 + i}" for i in range(4)}
    regs |= {f"{t}{i}": f"${6 + 4 * k + i}" for k, t in enumerate("lh") for i in range(4)}
    return _render(dot_program(code), regs, ["q4, c, x, y, m, ls, hs, t, acc", "lo, hi, sh"])


def _render(steps: list[tuple], regs: dict, scratch: list[str]) -> str:
    """PTX of a step list: `regs` names the operands ($n), `scratch` the b32 and b16 registers it declares."""
    name = lambda r: regs.get(r, r) if isinstance(r, str) else f"{r:#x}"  # noqa: E731
    lines = ["{", f".reg .b32 {scratch[0]};", f".reg .b16 {scratch[1]};"]
    for op, dst, *src in steps:
        if op == "f16pair":  # fp16 pair (low half: the low nibble's value) to two float32
            lines += [f"mov.b32 {{lo, hi}}, {name(src[1])};", f"cvt.f32.f16 {name(dst)}, hi;",
                      f"cvt.f32.f16 {name(src[0])}, lo;"]
        elif op == "hfma":
            a, b, c = name(src[0]), name(src[1]), src[2]
            lines.append(f"mul.rn.f16x2 {dst}, {a}, {b};" if c is None else f"fma.rn.f16x2 {dst}, {a}, {b}, {c};")
        elif op == "lds":
            lines += [f"add.u32 {name(src[0])}, {name(src[0])}, base;", f"ld.shared.b32 {name(dst)}, [{name(src[0])}];"]
        elif op == "bfma":  # bf16x2 a * b + c (c = -0: the product rounded once)
            lines.append(f"fma.rn.bf16x2 {name(dst)}, {name(src[0])}, {name(src[1])}, {name(src[2])};")
        elif op == "hsum":  # the two fp16 halves added in fp16, widened once
            lines += [f"mov.b32 {{lo, hi}}, {name(src[0])};", "add.rn.f16 sh, lo, hi;", f"cvt.f32.f16 {name(dst)}, sh;"]
        else:
            lines.append(f"{op}.b32 {name(dst)}, {', '.join(name(s) for s in src)};")
    lines.append("}")
    return "\n".join(lines)


def ptx(code: Sequence[float], table_operands: bool = False) -> str:
    """Inline PTX for `tl.inline_asm_elementwise(pack=4)`: $0-$7 the outputs, $8 the packed bytes.

    With `table_operands` the eight table words are inputs, not immediates: eight int32 tensors after the
    packed bytes, each four operands wide under pack=4 ($9, $13, ... hold them). A kernel that loads them
    once before its loop keeps them in registers; as immediates, ptxas rebuilt all eight in every lookup
    (about a sixth of the 4-bit loop's instructions on an H100).
    """
    regs = {f"o{i}": f"${i}" for i in range(8)} | {"q": "$8"}
    if table_operands:
        regs |= {f"{t}{i}": f"${9 + 4 * (4 * k + i)}" for k, t in enumerate("lh") for i in range(4)}
    tables = "" if table_operands else "l0, l1, l2, l3, h0, h1, h2, h3, "
    steps = [st for st in program(code) if not (table_operands and st[0] == "mov")]
    return _render(steps, regs, [f"{tables}q4, c, x, y, m, ls, hs, t", "lo, hi"])


def words(code: Sequence[float], half: str = "fp16") -> list[int]:
    """The eight table words in the order `ptx(..., table_operands=True)` and `scaled_pairs_ptx` take them
    (signed int32); `half` the format of the values, fp16 for the former, bf16 for the latter."""
    low, high = table_words(code, half)
    return _signed(low + high)


def _prmt(a: int, b: int, select: int) -> int:
    source = (b << 32 | a).to_bytes(8, "little")
    out = 0
    for i in range(4):
        s = select >> (4 * i) & 0xF
        byte = source[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = (a >> bit & 1) << 2 | (b >> bit & 1) << 1 | (c >> bit & 1)
        out |= (lut >> index & 1) << bit
    return out


def _f16(bits: int) -> float:
    return struct.unpack("<e", (bits & 0xFFFF).to_bytes(2, "little"))[0]


def _hfma(a: int, b: int, c: int | None) -> int:
    """fma.rn.f16x2 (mul.rn.f16x2 when c is None): per half, a * b + c exact, then rounded once."""
    out = 0
    for half in range(2):
        sh = 16 * half
        v = _f16(a >> sh) * _f16(b >> sh) + (0.0 if c is None else _f16(c >> sh))  # exact in float64
        out |= _f16_bits(v) << sh  # struct's 'e' rounds to nearest even, as the FMA
    return out


def emulate_dot(code: Sequence[float], packed: int, x_pairs: Sequence[int], smem: bool = False,
                lane: int = 0) -> float:
    """The float32 value `dot_ptx` (`smem_dot_ptx` with `smem`, as lane `lane`) computes for four packed
    bytes and the fp16 pair bits of x they meet."""
    low, high = table_words(code)
    r = {"q": packed & MASK32, "lane": 4 * lane} | {f"x{i}": x_pairs[i] & MASK32 for i in range(4)}
    r |= {f"l{i}": low[i] for i in range(4)} | {f"h{i}": high[i] for i in range(4)}
    table = {}
    if smem:  # shared memory as smem_dot_program lays it out: entry b's copy for lane l at 256 b + 4 l
        table = {256 * b + 4 * col: w & MASK32 for b, w in enumerate(pair_words(code)) for col in range(32)}
    for op, dst, *src in (smem_dot_program() if smem else dot_program(code)):
        if op == "lds":
            r[dst] = table[r[src[0]]]
        elif op == "hfma":
            r[dst] = _hfma(r[src[0]], r[src[1]], None if src[2] is None else r[src[2]])
        elif op == "hsum":
            pair = r[src[0]]
            r[dst] = _f16(_f16_bits(_f16(pair) + _f16(pair >> 16)))
        else:
            _step(r, op, dst, src)
    return r["s"]


def _step(r: dict, op: str, dst: str, src: list) -> None:
    val = lambda s: r[s] if isinstance(s, str) else s  # noqa: E731
    if op == "mov":
        r[dst] = src[0]
    elif op == "shl":
        r[dst] = val(src[0]) << src[1] & MASK32
    elif op == "shr":
        r[dst] = val(src[0]) >> src[1]
    elif op == "and":
        r[dst] = val(src[0]) & src[1]
    elif op == "prmt":
        r[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
    elif op == "lop3":
        r[dst] = _lop3(val(src[0]), val(src[1]), val(src[2]), src[3])
    else:
        raise ValueError(f"no such step: {op}")


def emulate(code: Sequence[float], packed: int) -> list[float]:
    """The eight values `ptx` produces for four packed bytes, in weight order (byte 0 high nibble first)."""
    r = {"q": packed & MASK32}
    for op, dst, *src in program(code):
        if op == "f16pair":
            pair = r[src[1]].to_bytes(4, "little")
            r[dst] = struct.unpack("<e", pair[2:])[0]
            r[src[0]] = struct.unpack("<e", pair[:2])[0]
        else:
            _step(r, op, dst, src)
    return [v for byte in range(4) for v in (r[f"o{byte}"], r[f"o{byte + 4}"])]
