"""A loaded model and its plan: stream tokens, and measure memory against the plan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Sequence

import torch

from heavylift.defaults import PREFILL_CHUNK_TOKENS as PREFILL_CHUNK
from heavylift.errors import InvalidArgumentError, OutOfMemoryError
from .loader import expected_int8_casts
from .sampling import Sampling

MEMORY_WARNING_FRACTION = 0.05  # measured memory more than 5% from the plan is reported


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    planned_bytes: int
    allocated_bytes: int
    peak_bytes: int | None  # the allocator's peak on a GPU; None on the CPU, which keeps no such count


@dataclass(frozen=True)
class Record:
    """One step of a stream: the new text and tokens, and the running figures."""

    text: str
    token_ids: tuple[int, ...]
    # "stop" (end of sequence), "length" (max tokens), None while running; `heavylift run --json` reports a
    # generation Ctrl-C stopped as "interrupted"
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    peak_bytes: dict[str, int] = field(default_factory=dict)


def join(records: Iterable[Record], prompt_tokens: int = 0) -> Record:
    """The records of one stream as one: their text and tokens, the last one's figures (no record yet:
    nothing generated from a prompt of `prompt_tokens`)."""
    pieces, ids, last = [], [], None
    for last in records:
        pieces.append(last.text)
        ids.extend(last.token_ids)
    if last is None:
        return Record("", (), None, prompt_tokens, 0, 0.0, 0.0)
    return replace(last, text="".join(pieces), token_ids=tuple(ids))


def _measure(plan_devices: dict[str, int], model: torch.nn.Module) -> tuple[DeviceMemory, ...]:
    out = []
    for dev, planned in plan_devices.items():
        if dev.startswith("cuda"):
            i = torch.device(dev).index
            out.append(DeviceMemory(dev, planned, torch.cuda.memory_allocated(i), torch.cuda.max_memory_allocated(i)))
        else:  # the CPU: bytes of the tensors the model holds there; no allocator peak to compare
            held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                       if t.device.type == "cpu")
            out.append(DeviceMemory(dev, planned, held, None))
    return tuple(out)


def _start_phase(planned: dict[str, int]) -> None:
    """Give the allocator's wholly free cached segments back to the driver, and make sure each GPU's cuBLAS
    workspace exists: both then sit below whatever the next phase allocates, as the plan replays it."""
    cuda = [torch.device(d) for d in planned if d.startswith("cuda")]
    if not cuda:
        return
    torch.cuda.empty_cache()
    for device in cuda:
        a = torch.zeros(16, 16, device=device)  # float32: every GPU multiplies it through cuBLAS
        (a @ a).sum()  # cuBLAS allocates this stream's workspace on its first matmul
    del a
    torch.cuda.empty_cache()


def wraps_in_template(tokenizer, prompt: str | Sequence[dict], raw: bool = False) -> bool:
    """Whether `encode` sends `prompt` through the tokenizer's chat template."""
    return not (isinstance(prompt, str) and (raw or not getattr(tokenizer, "chat_template", None)))


def encode(tokenizer, prompt: str | Sequence[dict], system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of a prompt: a string as is (`raw`, or a tokenizer without a chat template), else the
    string as a user turn, or a conversation (a list of {"role", "content"}), in the chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if not wraps_in_template(tokenizer, prompt, raw):
        if system:
            raise InvalidArgumentError("--system goes into the chat template, which "
                                       + ("--raw skips; drop one of them" if template else "this tokenizer lacks"))
        ids = tokenizer(prompt)["input_ids"]
    elif not template:
        raise InvalidArgumentError("a conversation needs a chat template, which this tokenizer lacks; "
                                   "send one prompt as text instead")
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidArgumentError("the prompt encodes to no tokens; give --prompt some text")
    return ids


def check_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Refuse a prompt that, with the tokens to generate, would not fit the context the plan is for."""
    if prompt_tokens + max_new_tokens > context:
        raise InvalidArgumentError(
            f"the prompt is {prompt_tokens} tokens and --max-new-tokens {max_new_tokens} would reach "
            f"{prompt_tokens + max_new_tokens}, beyond --context {context}; raise --context or shorten the prompt")


class Session:
    """A loaded model with its plan; `stream` yields a Record per token, `generate` joins them into one."""

    def __init__(self, weights, tokenizer, engine=None):
        self.source, self.plan, self.scheme = weights.source, weights.plan, weights.scheme
        self.placement, self.model, self.attention = weights.placement, weights.model, weights.attention
        self.offloaded_bytes = weights.offloaded_bytes
        self.tokenizer = tokenizer
        self.engine = engine  # the fast engine, or None: transformers runs the model
        self.engine_note = weights.runtime.reason  # why transformers runs it, when it does
        self.device = next(self.model.parameters()).device
        self._planned = {}
        for d in self.scheme.per_device:
            if d.layers:
                dev = self.placement.modules[f"model.layers.{d.layers.start}"]
                self._planned[dev] = self._planned.get(dev, 0) + d.total_bytes
        self.measured = _measure(self._planned, self.model)
        # transformers' forward prefills in chunks of this many tokens where its plan has whole ones not fit
        # (plan.DevicePlan.prefill_rows, the same on every device); 0: PREFILL_CHUNK
        self.prefill_chunk = 0 if engine is not None else min(
            (d.prefill_rows for d in self.scheme.per_device if d.layers and d.prefill_rows), default=0)

    @property
    def quant(self) -> str:
        return self.scheme.quant

    def encode(self, prompt: str | Sequence[dict], system: str | None = None, raw: bool = False) -> list[int]:
        return encode(self.tokenizer, prompt, system, raw)

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def stream(self, prompt: str | Sequence[dict], system: str | None = None, raw: bool = False,
               **sampling) -> Iterator[Record]:
        """Generate from `prompt` (see `encode`), one Record per new token."""
        params = Sampling(**sampling)
        ids = self.encode(prompt, system, raw)
        context = self.plan.context
        check_length(len(ids), params.max_new_tokens, context)
        try:
            yield from self._stream(ids, params)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of GPU memory at {len(ids)} prompt tokens with --context {context} in {self.quant}; "
                f"lower --context (to {context // 2}, say), or use a smaller --quant") from None

    def steps(self, prompts: torch.Tensor):
        """Prefill `prompts` [batch, tokens]: (their last logits [batch, vocab], a function from the next
        tokens [batch, 1] to the logits after them, a function giving the tokens cached per sequence).

        Memory runs as the plan replays it (memory.py): the allocator's cached blocks go back to the
        driver before each prefill phase and before decoding, so each phase starts from the live tensors.
        On the engine each prompt fills its own slot; on transformers, one preallocated StaticCache in chunks.
        """
        _start_phase(self._planned)
        engine = self.engine
        if engine is not None:
            rows = []
            for slot, row in enumerate(prompts):
                rows.append(engine.prefill(row.tolist(), slot=slot))
                _start_phase(self._planned)
            logits = torch.cat(rows)
            del rows
            return logits, lambda token: engine.decode(token.view(-1)), lambda: engine.lengths()[0]
        model, cache = self.model, self._static_cache(prompts.shape[0])
        prompts = prompts.to(self.device)
        chunk = self.prefill_chunk or PREFILL_CHUNK
        with expected_int8_casts():
            for start in range(0, prompts.shape[1], chunk):  # chunked prefill bounds the activation peak
                _start_phase(self._planned)
                piece = prompts[:, start:start + chunk]
                if start + chunk < prompts.shape[1]:  # only the last chunk needs logits: skip lm_head
                    model.model(input_ids=piece, cache=cache, use_cache=True)
                else:
                    logits = model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        del prompts, piece
        _start_phase(self._planned)

        def advance(token: torch.Tensor) -> torch.Tensor:
            with expected_int8_casts():
                return model(input_ids=token.to(self.device), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

        return logits, advance, lambda: int(cache.get_seq_length())

    def _static_cache(self, batch: int):
        """transformers' StaticCache for `batch` sequences of the plan's context, every layer's keys and
        values allocated now on that layer's device, before any activation.

        Preallocated rather than grown: a DynamicCache concatenates a larger tensor per chunk and leaves the
        smaller ones cached (29 GB at 32k tokens x 8 on an H100). The allocator's
        expandable_segments setting would only soften that: it is process-wide (PYTORCH_CUDA_ALLOC_CONF
        before CUDA starts, or a private torch call), so heavylift.load would change every allocation of
        its caller's process, and freed blocks inside a segment stay reserved all the same. A static cache
        allocates once, in the shapes the plan counts, as the engine's does. Its price: transformers then
        attends over all `context` positions (masked) at every decode step.
        """
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=self.plan.context)
        # What each layer caches per token (Architecture.kv_layout): heads of key and value channels, DeepSeek-V3's
        # compressed latent and shared RoPE key as one head of each.
        heads, key_dim, value_dim = self.plan.architecture.kv_layout
        dtype = self.model.get_input_embeddings().weight.dtype  # the compute dtype: embeddings stay unquantized
        for i, layer in enumerate(cache.layers):
            device = self.placement.modules[f"model.layers.{i}"]
            keys = torch.zeros((batch, heads, 0, key_dim), dtype=dtype, device=device)
            values = torch.zeros((batch, heads, 0, value_dim), dtype=dtype, device=device)
            layer.lazy_initialization(keys, values)
        return cache

    @torch.inference_mode()
    def _stream(self, ids: list[int], params: Sampling) -> Iterator[Record]:
        for dev in self._planned:
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(torch.device(dev).index)
        eos = self._eos_ids()
        generator = params.generator(self.device)
        t0 = time.perf_counter()
        logits, advance, _ = self.steps(torch.tensor([ids]))
        token = params.choose(logits, generator)
        self._sync()
        t1 = time.perf_counter()
        prefill_rate = len(ids) / max(t1 - t0, 1e-9)
        out: list[int] = []
        shown = ""
        for step in range(params.max_new_tokens):
            out.append(int(token))
            finish = "stop" if out[-1] in eos else ("length" if step + 1 == params.max_new_tokens else None)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            piece = "" if text.endswith("\ufffd") and finish is None else text[len(shown):]
            shown = text if piece or finish else shown
            decode_rate = (len(out) - 1) / max(time.perf_counter() - t1, 1e-9) if len(out) > 1 else 0.0
            yield Record(piece, (out[-1],), finish, len(ids), len(out), prefill_rate, decode_rate, self._peaks())
            if finish:
                return
            token = params.choose(advance(token.view(1, 1)), generator)

    def generate(self, prompt: str | Sequence[dict], system: str | None = None, raw: bool = False,
                 **sampling) -> Record:
        """The whole generation as one Record: a loop over `stream`."""
        return join(self.stream(prompt, system, raw, **sampling))

    def remeasure(self) -> tuple[DeviceMemory, ...]:
        self.measured = _measure(self._planned, self.model)
        return self.measured

    def memory_warnings(self) -> list[str]:
        out = []
        for m in self.measured:
            if m.peak_bytes is not None and m.planned_bytes and abs(m.peak_bytes - m.planned_bytes) > MEMORY_WARNING_FRACTION * m.planned_bytes:
                out.append(f"{m.device}: measured peak {m.peak_bytes / 1e9:.2f} GB vs planned {m.planned_bytes / 1e9:.2f} GB")
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _peaks(self) -> dict[str, int]:
        return {d: torch.cuda.max_memory_allocated(torch.device(d).index) for d in self._planned if d.startswith("cuda")}
