"""bench/two_gpu.py's children: one model on this machine's two GPUs (or, --cpu-check, the CPU standing for
them), loaded, measured against its plan, compared and timed, one step at a time until the deadline.

Units: `8b` (run: bf16 and NF4-DQ, heavylift split and on one GPU) and `70b-<quant>` (the 70B slice in one
precision: heavylift split, heavylift on one GPU, the reference stack split; run and decode). Each step's
records are written as soon as it ends, so a child killed at the deadline loses only the step it was in.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # the tests' conftest (the tiny tokenizer) would turn it on

import torch  # noqa: E402

import validate_plan as vp  # noqa: E402
from two_gpu import BIG, EIGHT_B, EIGHT_B_QUANTS, greedy_record, planned_shares, rooflines  # noqa: E402
from two_gpu import device_map_summary, write_json  # noqa: E402

RUN_CONTEXT = 4096  # the run part's plan, as bench/run_gpu.py plans it
RUN_PROMPT, RUN_NEW = 1024, 64  # random prompt ids, greedy tokens compared
DECODE_BATCHES = (1, 16)
BIG_CHECKPOINT = "/tmp/llama70b-{layers}l-heavylift"
# --cpu-check: the same steps on tiny shapes of the same families, planned for two described H100s.
CPU_CHECK_GPUS = "H100"
CPU_CHECK_LAYERS = 4
CPU_EIGHT_B = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=CPU_CHECK_LAYERS, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=320)
CPU_SECOND_DEVICE = torch.device("cpu", 0)  # a second handle on the CPU: the engine keys its segments by device


def split_engine(engine, at: int):
    """The CPU check's two devices: the same engine with layers `at`.. on a second CPU handle, so its pipeline
    runs two segments (per-device buffers, cache lengths and the carry between them) as over two GPUs."""
    from dataclasses import replace

    from heavylift.engine.model import Engine

    layers = [replace(layer, device=CPU_SECOND_DEVICE if i >= at else layer.device)
              for i, layer in enumerate(engine.layers)]
    return Engine(engine.shape, layers, engine.embed, engine.norm, engine.lm_head, engine.rotary, engine.batch,
                  engine.context, engine.ops.name)


class NullMeter:
    """The CPU's stand-in for validate_plan.Meter: no driver to poll."""

    def __init__(self, count: int):
        self.count, self.start_bytes = count, [None] * count

    def phase(self, name: str) -> None:
        pass

    def stop(self) -> None:
        pass

    def by_device(self) -> list[dict]:
        return [{} for _ in range(self.count)]


class Machine:
    """Where a child loads: this machine's first two GPUs, or (cpu_check) the CPU, planned as two described GPUs."""

    def __init__(self, cpu_check: bool):
        self.cpu = cpu_check
        self.count = 2
        self._bandwidths: dict[int, float] | None = None
        self.bandwidth_source = "datasheet (the plan's devices)" if cpu_check else "copy (measured per device)"
        self.native_fp8 = not cpu_check and torch.cuda.get_device_capability(0) >= (8, 9)

    def fresh(self) -> None:
        """Between loads: the allocator's cache back to the driver, its peaks from zero."""
        gc.collect()
        if not self.cpu:
            torch.cuda.empty_cache()
            for i in range(self.count):
                torch.cuda.reset_peak_memory_stats(i)

    def meter(self):
        return NullMeter(self.count) if self.cpu else vp.Meter(self.count)

    def plan(self, folder: str, quant: str, gpus: int):
        """The Plan heavylift loads `folder` by on `gpus` of these devices, for the run part's workload."""
        import heavylift

        if self.cpu:
            where, engine = f"{gpus}x{CPU_CHECK_GPUS}", "fast"
        else:
            from heavylift.runtime.devices import devices_here

            where, engine = devices_here()[:gpus], "auto"
        return heavylift.plan(folder, gpus=where, context=RUN_CONTEXT, batch=1, quant=quant, engine=engine)

    def load(self, folder: str, quant: str, gpus: int):
        """heavylift.load on the first `gpus` GPUs: (session, the plan it loaded by). On the CPU: one load on the
        CPU, its engine split where the described plan splits the layers, or in the middle where the plan keeps a
        toy model on one device (its layers weigh kilobytes beside each device's fixed costs)."""
        import heavylift

        if not self.cpu:
            from heavylift.runtime.devices import devices_here

            session = heavylift.load(folder, quant=quant, gpus=None if gpus == self.count else devices_here()[:gpus],
                                     context=RUN_CONTEXT, batch=1)
            return session, session.scheme
        session = heavylift.load(folder, quant=quant, context=RUN_CONTEXT, batch=1, engine="fast")
        scheme = self.plan(folder, quant, gpus).scheme(quant)
        runs = [d.layers for d in scheme.per_device if d.layers]
        if gpus > 1:
            layers = len(session.engine.layers)
            session.engine = split_engine(session.engine, runs[1].start if len(runs) > 1 else layers // 2)
        return session, scheme

    def bandwidths(self, scheme) -> dict[int, float]:
        """Bytes/s per device index: each GPU's device-to-device copy (measured once, that GPU current), or on the
        CPU the plan's datasheet figures."""
        if self.cpu:
            return {d.device.index: d.device.bandwidth_bytes_s for d in scheme.per_device}
        if self._bandwidths is None:
            from heavylift.runtime.benchmark import copy_bandwidth

            self._bandwidths = {}
            for i in range(self.count):
                with torch.cuda.device(i):  # its events and synchronize time this GPU's copies
                    self._bandwidths[i] = copy_bandwidth(f"cuda:{i}")
        return self._bandwidths

    def driver_used(self) -> dict[int, int]:
        """Each GPU's used bytes as NVML (else nvidia-smi) reports them: every process's, the CUDA context's too."""
        if self.cpu:
            return {}
        from heavylift.hardware.detect import detect_devices

        return {d.index: d.total_bytes - d.free_bytes for d in detect_devices()
                if d.kind == "cuda" and d.free_bytes is not None}

    def allocated(self) -> dict[int, dict]:
        if self.cpu:
            return {}
        return {i: {"allocated_bytes": torch.cuda.memory_allocated(i),
                    "max_memory_allocated": torch.cuda.max_memory_allocated(i),
                    "max_memory_reserved": torch.cuda.max_memory_reserved(i)} for i in range(self.count)}


class Unit:
    """One child's steps against the deadline, and its records as written so far."""

    def __init__(self, name: str, deadline: float, out: Path, machine: Machine, work: Path, layers: int):
        self.name, self.deadline, self.out, self.machine = name, deadline, out, machine
        self.work, self.layers = work, layers
        self.doc = {"unit": name, "records": [], "not_started": [], "errors": [], "steps": [], "running": None}

    def save(self) -> None:
        write_json(self.out, self.doc)

    def add(self, *records: dict) -> None:
        self.doc["records"] += records
        self.save()

    def step(self, name: str, fn):
        """fn() unless the deadline has passed; an error is recorded and the next step still runs."""
        if time.time() >= self.deadline:
            self.doc["not_started"].append(name)
            self.save()
            return None
        self.doc["running"] = name
        self.save()
        print(f"[{self.name}] {name}", flush=True)
        t, status, value = time.perf_counter(), "ok", None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - one step failing must not lose the others' figures
            traceback.print_exc()
            status = "error"
            self.doc["errors"].append({"step": f"{self.name}: {name}", "error": f"{type(e).__name__}: {e}"[:800]})
        self.machine.fresh()
        self.doc["steps"].append({"step": f"{self.name}: {name}", "seconds": round(time.perf_counter() - t, 1),
                                  "status": status})
        self.doc["running"] = None
        self.save()
        return value


# --- Checkpoints ---------------------------------------------------------------------------------------

def eight_b_checkpoint(u: Unit) -> str:
    """bench/run_gpu.py's 8B-shaped random checkpoint (its own folder, kept), or its tiny shape on the CPU."""
    import run_gpu

    if u.machine.cpu:
        folder = str(u.work / "cpu-8b")
        run_gpu.make_checkpoint(folder, device="cpu", **CPU_EIGHT_B)
        return folder
    run_gpu.make_checkpoint()
    return run_gpu.CKPT


def big_config(layers: int, cpu: bool) -> dict:
    """The catalog's Llama 3.1 70B config.json cut to `layers` layers; on the CPU, its toy shape."""
    from heavylift.model.catalog import require_model

    config = vp.cut_layers(require_model("llama3.1-70b").config_dict(), layers)
    return {**vp.shrink_config(config), "num_hidden_layers": CPU_CHECK_LAYERS} if cpu else config


def big_checkpoint(u: Unit) -> str:
    """The 70B slice as validate_plan.py writes checkpoints (a shard per layer, made on the GPU; kept)."""
    folder = u.work / "cpu-70b" if u.machine.cpu else Path(BIG_CHECKPOINT.format(layers=u.layers))
    if not (folder / "config.json").exists():
        vp.build_checkpoint(big_config(u.layers, u.machine.cpu), folder, "cpu" if u.machine.cpu else "cuda")
    return str(folder)


# --- Loads, measured ---------------------------------------------------------------------------------------

def prompt_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, min(vocab, 128000), (RUN_PROMPT,), generator=torch.Generator().manual_seed(0))


def greedy(session, ids: torch.Tensor, new: int, mark) -> tuple[list[int], torch.Tensor]:
    """`new` greedy tokens after `ids` through the session's own steps (heavylift's engine where it runs), and
    the prompt's last logits; mark("prefill") and mark("decode") close the meter's phases."""
    with torch.inference_mode():
        logits, advance, _ = session.steps(ids[None])
        first = logits.float().reshape(-1).cpu()
        mark("prefill")
        tokens, token = [], first.argmax()
        for _ in range(new):
            tokens.append(int(token))
            token = advance(torch.tensor([[tokens[-1]]])).float().reshape(-1).argmax()
        mark("decode")
    return tokens, first


def rel_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Largest difference of two logit vectors over the largest logit of the second."""
    if a is None or b is None:
        return None
    return ((a - b).abs().max() / b.abs().max()).item()


def memory_record(u: Unit, model: str, quant: str, gpus: int, scheme, session, meter, load_s: float) -> dict:
    """The plan's devices beside what each measured (validate_plan's record: phases load, prefill, decode)."""
    from heavylift.planner.runtimes import AUTO

    record = vp.base_record(vp.Case(model, quant, RUN_CONTEXT, 1, gpus, engine=AUTO), scheme)
    phases, used = meter.by_device(), u.machine.driver_used()
    for planned in record["devices"]:
        i = planned["index"]
        planned.update(vp.device_record(planned, phases[i]), start_bytes=meter.start_bytes[i],
                       driver_used_end_bytes=used.get(i))
    record.update(part="run", kind="memory", load_s=round(load_s, 2), engine_used=session.scheme.engine,
                  engine_segments=engine_segments(session.engine),
                  attention=session.attention, prompt_tokens=RUN_PROMPT, new_tokens=RUN_NEW,
                  session_measured=[asdict(m) for m in session.remeasure()])
    return record


def engine_segments(engine) -> list[dict] | None:
    """The engine's pipeline as it runs: each segment's device and its layers [start, stop)."""
    if engine is None:
        return None
    out, start = [], 0
    for device, layers in engine.segments:
        out.append({"device": str(device), "layers": [start, start + len(layers)]})
        start += len(layers)
    return out


def decode_record(model: str, quant: str, stack: str, gpus: int, batch: int, rate: float, shares, source: str) -> dict:
    return {"part": "decode", "kind": "decode", "model": model, "quant": quant, "stack": stack, "gpus": gpus,
            "batch": batch, "decode_tok_s": rate, **rooflines(shares, batch), "bandwidth_source": source,
            "shares": [asdict(s) for s in shares]}


def timed_batches(arch, scheme, bandwidths: dict[int, float], rate_of) -> list[tuple[int, float, list]]:
    """(batch, tok/s, the plan's shares at the timed length) for each of DECODE_BATCHES."""
    from heavylift.runtime.benchmark import decode_lengths

    out = []
    for batch in DECODE_BATCHES:
        prompt, new = decode_lengths(batch)
        out.append((batch, rate_of(batch, prompt, new), planned_shares(arch, scheme, prompt + new / 2, bandwidths)))
    return out


def heavylift_run(u: Unit, folder: str, model: str, quant: str, gpus: int, decode: bool) -> dict:
    """Load by the plan on `gpus` GPUs, measure memory through a greedy run, then (decode) time the engine."""
    from heavylift.runtime.benchmark import engine_decode_tok_s, sweep_engine

    machine = u.machine
    machine.fresh()
    meter = machine.meter()
    try:
        t = time.perf_counter()
        session, scheme = machine.load(folder, quant, gpus)
        load_s = time.perf_counter() - t
        meter.phase("load")
        tokens, first = greedy(session, prompt_ids(session.model.config.vocab_size), RUN_NEW, meter.phase)
    finally:
        meter.stop()
    u.add(memory_record(u, model, quant, gpus, scheme, session, meter, load_s))
    if decode:
        if session.engine is None:
            raise RuntimeError(f"transformers runs this load ({session.engine_note}): no engine to time")
        engine = sweep_engine(session.engine, DECODE_BATCHES)  # a cache for batch 16 (the session's is released)
        timed = timed_batches(session.plan.architecture, scheme, machine.bandwidths(scheme),
                              lambda b, p, n: engine_decode_tok_s(engine, b, p, n))
        u.add(*(decode_record(model, quant, "heavylift", gpus, b, r, s, machine.bandwidth_source) for b, r, s in timed))
    return {"tokens": tokens, "first_logits": first}


def reference_quantization(quant: str, native_fp8: bool):
    """The reference stack's quantization, as the seed's seed_baseline.py configures it: bitsandbytes NF4 with
    double quantization computing in bf16; torchao FP8 per row with dynamic activation scaling (weight-only
    where the device has no FP8 matmul, which torchao's dynamic scaling refuses)."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if quant == "bf16":
        return None
    if quant == "nf4-dq":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if quant == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

        return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if native_fp8
                             else Float8WeightOnlyConfig())
    raise ValueError(f"the reference stack has no configuration for {quant}")


def reference_run(u: Unit, folder: str, model: str, quant: str, decode: bool) -> dict:
    """transformers + accelerate (device_map="auto": balanced over the visible GPUs) on the same checkpoint:
    its split and memory, greedy tokens through generate, then (decode) generate's rate on the plan's shares."""
    from transformers import AutoModelForCausalLM

    from heavylift.runtime.benchmark import reference_decode_tok_s

    machine = u.machine
    machine.fresh()
    t = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto",
                                               quantization_config=reference_quantization(quant, machine.native_fp8))
    load_s = time.perf_counter() - t
    dev = next(ref.parameters()).device
    device_map = getattr(ref, "hf_device_map", None) or {"": str(dev)}
    ids = prompt_ids(ref.config.vocab_size)
    with torch.inference_mode():
        out = ref.generate(ids[None].to(dev), max_new_tokens=RUN_NEW, min_new_tokens=RUN_NEW, do_sample=False,
                           pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    tokens, first = out.sequences[0, RUN_PROMPT:].tolist(), out.logits[0][0].float().reshape(-1).cpu()
    gpus = len(set(device_map.values()))
    u.add({"part": "run", "kind": "reference_load", "model": model, "quant": quant, "gpus": gpus,
           "load_s": round(load_s, 2), "device_map": device_map_summary(device_map), "devices": machine.allocated()})
    if decode:
        plan = machine.plan(folder, quant, machine.count)  # heavylift's split of the same weights: its shares
        scheme = plan.scheme(quant)
        timed = timed_batches(plan.architecture, scheme, machine.bandwidths(scheme),
                              lambda b, p, n: reference_decode_tok_s(ref, b, p, n))
        u.add(*(decode_record(model, quant, "reference", gpus, b, r, s, machine.bandwidth_source) for b, r, s in timed))
    return {"tokens": tokens, "first_logits": first}  # the model is freed as this returns


# --- Units ------------------------------------------------------------------------------------------------

def compare(u: Unit, model: str, quant: str, a: tuple[str, dict | None], b: tuple[str, dict | None]) -> None:
    (name_a, run_a), (name_b, run_b) = a, b
    if run_a and run_b:
        u.add(greedy_record(model, quant, name_a, name_b, run_a["tokens"], run_b["tokens"],
                            rel_diff(run_a["first_logits"], run_b["first_logits"])))


def unit_8b(u: Unit) -> None:
    model = f"{EIGHT_B}-toy" if u.machine.cpu else EIGHT_B
    folder = u.step("checkpoint", lambda: eight_b_checkpoint(u))
    if folder is None:
        return
    for quant in EIGHT_B_QUANTS:
        split = u.step(f"{quant}: heavylift on 2 GPUs", lambda: heavylift_run(u, folder, model, quant, 2, False))
        one = u.step(f"{quant}: heavylift on 1 GPU", lambda: heavylift_run(u, folder, model, quant, 1, False))
        compare(u, model, quant, ("heavylift 2 GPUs", split), ("heavylift 1 GPU", one))


def unit_big(u: Unit, quant: str, parts: tuple[str, ...]) -> None:
    model, decode = f"{BIG}-{'toy' if u.machine.cpu else f'{u.layers}l'}", "decode" in parts
    folder = u.step("checkpoint", lambda: big_checkpoint(u))
    if folder is None:
        return
    split = u.step("heavylift on 2 GPUs", lambda: heavylift_run(u, folder, model, quant, 2, decode))
    one = u.step("heavylift on 1 GPU", lambda: heavylift_run(u, folder, model, quant, 1, decode))
    ref = u.step("reference on 2 GPUs", lambda: reference_run(u, folder, model, quant, decode))
    compare(u, model, quant, ("heavylift 2 GPUs", split), ("heavylift 1 GPU", one))
    compare(u, model, quant, ("heavylift 2 GPUs", split), ("reference 2 GPUs", ref))


def run_unit(name: str, parts: tuple[str, ...], deadline: float, out: Path, layers: int, work: Path,
             cpu_check: bool) -> None:
    if not cpu_check and torch.cuda.device_count() < 2:
        sys.exit(f"two GPUs are needed and torch sees {torch.cuda.device_count()}")
    u = Unit(name, deadline, out, Machine(cpu_check), work, layers)
    u.doc["devices"] = ["cpu"] if cpu_check else [torch.cuda.get_device_name(i) for i in range(2)]
    if name == "8b":
        unit_8b(u)
    else:
        unit_big(u, name.removeprefix("70b-"), parts)
    u.save()
