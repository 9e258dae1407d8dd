"""`heavylift.load()`: plan, refuse what cannot fit, load by the plan, check reality, stream tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from heavylift.api import plan as make_plan
from heavylift.defaults import DEFAULT_CONTEXT_TOKENS, PREFILL_CHUNK_TOKENS as PREFILL_CHUNK
from heavylift.errors import CheckpointError, InvalidArgumentError, ModelNotFoundError, OutOfMemoryError, PlanDoesNotFitError
from .loader import (Placement, attention_implementation, guard_offload, load_model, module_bytes,
                     placement_from_plan, real_placement)
from heavylift.planner.memory import FAST, TRANSFORMERS
from heavylift.planner.plan import Plan, SchemePlan
from heavylift.planner.runtimes import planned_runtime
from .sampling import Sampling
from heavylift.model.architecture import head_dim_of
from heavylift.model.source import ModelSource, no_weights_error, resolve_model

MEMORY_WARNING_FRACTION = 0.05  # measured memory more than 5% from the plan is reported


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    planned_bytes: int
    allocated_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class Record:
    """One step of a stream: the new text and tokens, and the running figures."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" (end of sequence), "length" (max tokens), or None while running
    prompt_tokens: int
    generated_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    peak_bytes: dict[str, int] = field(default_factory=dict)


def _measure(plan_devices: dict[str, int], model: torch.nn.Module) -> tuple[DeviceMemory, ...]:
    out = []
    for dev, planned in plan_devices.items():
        if dev.startswith("cuda"):
            i = torch.device(dev).index
            out.append(DeviceMemory(dev, planned, torch.cuda.memory_allocated(i), torch.cuda.max_memory_allocated(i)))
        else:  # the CPU: bytes of the tensors the model holds there
            held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                       if t.device.type == "cpu")
            out.append(DeviceMemory(dev, planned, held, held))
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


class Session:
    """A loaded model with its plan; `stream` yields Records, `generate` returns the last one."""

    def __init__(self, source: ModelSource, plan: Plan, scheme: SchemePlan, placement: Placement, model,
                 tokenizer, attention: str, offloaded_bytes: dict[str, int], engine=None, engine_note: str = ""):
        self.source, self.plan, self.scheme, self.placement = source, plan, scheme, placement
        self.model, self.tokenizer, self.attention = model, tokenizer, attention
        self.offloaded_bytes = offloaded_bytes
        self.engine = engine  # the fast engine, or None: transformers runs the model
        self.engine_note = engine_note  # why transformers runs it, when it does
        self.device = next(model.parameters()).device
        self._planned = {}
        for d in scheme.per_device:
            if d.layers:
                dev = placement.modules[f"model.layers.{d.layers.start}"]
                self._planned[dev] = self._planned.get(dev, 0) + d.total_bytes
        self.measured = _measure(self._planned, model)

    @property
    def quant(self) -> str:
        return self.scheme.quant

    def encode(self, prompt: str | Sequence[dict], system: str | None = None) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str) and not getattr(tok, "chat_template", None):
            return tok(prompt)["input_ids"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def stream(self, prompt: str | Sequence[dict], system: str | None = None, **sampling) -> Iterator[Record]:
        params = sampling if isinstance(sampling, Sampling) else Sampling(**sampling)
        ids = self.encode(prompt, system)
        context = self.plan.context
        if len(ids) + params.max_new_tokens > context:
            raise InvalidArgumentError(
                f"the prompt is {len(ids)} tokens and --max-new-tokens {params.max_new_tokens} would reach "
                f"{len(ids) + params.max_new_tokens}, beyond --context {context}; raise --context or shorten the prompt")
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
        for start in range(0, prompts.shape[1], PREFILL_CHUNK):  # chunked prefill bounds the activation peak
            _start_phase(self._planned)
            piece = prompts[:, start:start + PREFILL_CHUNK]
            if start + PREFILL_CHUNK < prompts.shape[1]:  # only the last chunk needs logits: skip lm_head
                model.model(input_ids=piece, cache=cache, use_cache=True)
            else:
                logits = model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        del prompts, piece
        _start_phase(self._planned)
        advance = lambda token: model(input_ids=token.to(self.device), cache=cache, use_cache=True,  # noqa: E731
                                      logits_to_keep=1).logits[:, -1]
        return logits, advance, lambda: int(cache.get_seq_length())

    def _static_cache(self, batch: int):
        """transformers' StaticCache for `batch` sequences of the plan's context, every layer's keys and
        values allocated now on that layer's device, before any activation.

        Preallocated rather than grown: a DynamicCache concatenates a larger tensor per chunk and leaves the
        smaller ones cached (29 GB at 32k tokens x 8 on an H100, issue 4). The allocator's
        expandable_segments setting would only soften that: it is process-wide (PYTORCH_CUDA_ALLOC_CONF
        before CUDA starts, or a private torch call), so heavylift.load would change every allocation of
        its caller's process, and freed blocks inside a segment stay reserved all the same. A static cache
        allocates once, in the shapes the plan counts, as the engine's does. Its price: transformers then
        attends over all `context` positions (masked) at every decode step.
        """
        from transformers import StaticCache

        config = self.model.config.get_text_config(decoder=True)
        cache = StaticCache(config=self.model.config, max_cache_len=self.plan.context)
        head_dim = head_dim_of(config.to_dict())
        dtype = self.model.get_input_embeddings().weight.dtype  # the compute dtype: embeddings stay unquantized
        for i, layer in enumerate(cache.layers):
            device = self.placement.modules[f"model.layers.{i}"]
            empty = torch.zeros((batch, config.num_key_value_heads, 0, head_dim), dtype=dtype, device=device)
            layer.lazy_initialization(empty, empty)
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

    def generate(self, prompt: str | Sequence[dict], system: str | None = None, **sampling) -> Record:
        """The whole generation as one Record: a loop over `stream`."""
        pieces, ids, last = [], [], None
        for last in self.stream(prompt, system, **sampling):
            pieces.append(last.text)
            ids.extend(last.token_ids)
        return Record("".join(pieces), tuple(ids), last.finish_reason, last.prompt_tokens, last.generated_tokens,
                      last.prefill_tok_s, last.decode_tok_s, last.peak_bytes)

    def remeasure(self) -> tuple[DeviceMemory, ...]:
        self.measured = _measure(self._planned, self.model)
        return self.measured

    def memory_warnings(self) -> list[str]:
        out = []
        for m in self.measured:
            if m.planned_bytes and abs(m.peak_bytes - m.planned_bytes) > MEMORY_WARNING_FRACTION * m.planned_bytes:
                out.append(f"{m.device}: measured peak {m.peak_bytes / 1e9:.2f} GB vs planned {m.planned_bytes / 1e9:.2f} GB")
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _peaks(self) -> dict[str, int]:
        return {d: torch.cuda.max_memory_allocated(torch.device(d).index) for d in self._planned if d.startswith("cuda")}


def _checkpoint_folder(source: ModelSource):
    if source.checkpoint is not None:
        return source.folder
    if source.origin == "catalog" or source.hub_id is None:
        raise no_weights_error(source)
    from huggingface_hub import snapshot_download

    try:  # only now, once the plan fits: the weights, the tokenizer, the config
        return snapshot_download(source.hub_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja",
                                                                 "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise ModelNotFoundError(f"cannot download {source.hub_id}: {type(e).__name__}; check the network, "
                                 "the id, and `hf auth login` for gated models") from None


def _tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - a missing or broken tokenizer is the user's to fix
        raise CheckpointError(f"no usable tokenizer in {folder}; copy tokenizer.json and tokenizer_config.json "
                              "from the original model") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as the seed article does
    return tok


@dataclass(frozen=True)
class Loaded:
    """A model loaded by its plan, before any engine or tokenizer is put over it."""

    source: ModelSource
    plan: Plan
    scheme: SchemePlan
    placement: Placement
    model: torch.nn.Module
    folder: object  # the checkpoint folder (Path)
    attention: str
    offloaded_bytes: dict[str, int]


def load_weights(model: str, quant: str = "auto", gpus=None, context: int = DEFAULT_CONTEXT_TOKENS, batch: int = 1,
                 allow_offload: bool = False, reserve: int | str = 0, engine: str = "auto") -> Loaded:
    """Plan `model` for the runtime that will run it (`engine`: auto, fast or transformers), stop before
    any download if it cannot fit, then load its weights exactly as planned."""
    from pathlib import Path

    quants = "all" if quant == "auto" else quant
    plan = make_plan(model, gpus=gpus, context=context, batch=batch, quant=quants, reserve=reserve,
                     allow_offload=allow_offload, engine=engine)
    config = resolve_model(model).config
    planned = planned_engine(config, "bf16" if quant == "auto" else quant, plan.devices, engine)
    plan = replan(plan, planned)
    chosen = plan.recommended if quant == "auto" else quant
    if chosen is None and allow_offload:
        chosen = next((s.quant for s in reversed(plan.schemes) if s.offload), None)
    if chosen is None:
        best = plan.schemes[-1]
        raise PlanDoesNotFitError(f"{model} does not fit in any precision: {'; '.join(best.advice)}")
    runs = planned_engine(config, chosen, plan.devices, engine, offload=bool(plan.scheme(chosen).offload))
    plan = replan(plan, runs)
    scheme = plan.scheme(chosen)
    if not scheme.fits and not scheme.offload:
        raise PlanDoesNotFitError(f"{model} in {chosen} does not fit: {'; '.join(scheme.advice)}")
    source = resolve_model(model)
    folder = Path(_checkpoint_folder(source))
    if source.checkpoint is None:
        source = resolve_model(str(folder))  # check the downloaded headers against the config too
    placement = placement_from_plan(source.architecture, scheme)
    attention = attention_implementation(source.architecture)
    devices = plan.devices
    native_fp8 = torch.cuda.is_available() and all(d.native_fp8 for d in devices)
    bf16 = all(d.bf16_supported for d in devices)
    loaded = load_model(folder, source.architecture, scheme, placement, native_fp8, bf16, attention)
    names = list(placement.modules)
    spilled = guard_offload(placement, real_placement(loaded, names),
                            {n: module_bytes(loaded, n) for n in names}, allow_offload)
    return Loaded(source, plan, scheme, placement, loaded, folder, attention, spilled)


def planned_engine(config, quant: str, devices, engine: str, offload: bool = False) -> str:
    """The runtime that will run this model (memory.FAST or memory.TRANSFORMERS), decided before loading
    by the planner's rules (runtimes.planned_runtime) on the devices the plan's layers will really land on
    here, so the plan can describe it. build_engine decides the same after loading."""
    from heavylift.engine import device_reason
    from .loader import runtime_device

    where = [torch.device(runtime_device(d.index)) for d in devices] + ([torch.device("cpu")] if offload else [])
    return planned_runtime(config, quant, engine, device_reason(where), all(d.type == "cpu" for d in where))


def replan(plan: Plan, engine: str) -> Plan:
    """The same plan for another runtime (memory.FAST or memory.TRANSFORMERS)."""
    from dataclasses import replace

    from heavylift.planner.plan import make_plan as plan_layout

    if plan.workload.engine == engine:
        return plan
    return plan_layout(plan.model, plan.architecture, plan.devices, replace(plan.workload, engine=engine),
                       [s.quant for s in plan.schemes])


def build_engine(model: torch.nn.Module, quant: str, context: int, batch: int, engine: str):
    """(the fast engine or None, the one-line reason when transformers runs the model instead).

    `engine` is one of engine.ENGINES: auto takes the engine where its kernels run; fast insists,
    and on an all-CPU model runs the engine's torch reference path.
    """
    from heavylift.engine import FAST, TRANSFORMERS, Engine, device_reason, model_reason

    if engine == TRANSFORMERS:
        return None, "--engine transformers"
    devices = {p.device for p in model.parameters()}
    reason = model_reason(model.config, quant)
    if reason is not None:
        if engine == FAST:
            raise InvalidArgumentError(f"{reason}; run it with --engine transformers")
        return None, reason
    on_devices = device_reason(devices)
    if on_devices is None:
        return Engine.from_model(model, batch=batch, context=context, ops="triton"), ""
    if engine == FAST and all(d.type == "cpu" for d in devices):
        return Engine.from_model(model, batch=batch, context=context, ops="torch"), ""
    if engine == FAST:
        raise InvalidArgumentError(f"{on_devices}; run it with --engine transformers")
    return None, on_devices


def load(model: str, quant: str = "auto", gpus=None, context: int = DEFAULT_CONTEXT_TOKENS, batch: int = 1,
         allow_offload: bool = False, reserve: int | str = 0, engine: str = "auto") -> Session:
    """Plan `model` for the runtime that will run it, stop before any download if it cannot fit, load it
    exactly as planned, and put the fast engine over it where it runs (`engine="auto"`), else
    transformers with the reason in `engine_note`."""
    from heavylift.engine import check_engine

    check_engine(engine)
    w = load_weights(model, quant, gpus, context, batch, allow_offload, reserve, engine)
    tokenizer = _tokenizer(w.folder)
    fast, note = build_engine(w.model, w.scheme.quant, w.plan.context, batch, engine)
    plan = replan(w.plan, FAST if fast is not None else TRANSFORMERS)  # a module that spilled to the CPU
    return Session(w.source, plan, plan.scheme(w.scheme.quant), w.placement, w.model, tokenizer, w.attention,
                   w.offloaded_bytes, fast, note)
