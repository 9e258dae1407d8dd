"""How a plan is shown to a person: its tables and advice (the JSON contract is planner/contract.py)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from heavylift.planner.contract import device_id
from heavylift.planner.memory import FAST, TRANSFORMERS
from heavylift.planner.plan import DevicePlan, Plan, SchemePlan


# How the report names the runtime a plan describes.
RUNTIME_NAMES = {FAST: "heavylift's engine", TRANSFORMERS: "transformers' forward"}


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f}"


def _layers(d: DevicePlan) -> str:
    return f"{d.layers.start}-{d.layers.stop - 1}" if d.layers else "-"


def render(plan: Plan, console: Console) -> None:
    arch, work = plan.architecture, plan.workload
    devices = ", ".join(f"#{d.index} {d.name} {gb(d.memory_bytes)} GB" for d in plan.devices)
    console.print(f"[bold]{plan.model}[/] ({arch.model_type}, {arch.params:,} parameters, {arch.num_layers} layers)")
    console.print(f"context {work.context:,} tokens x batch {work.batch}, KV cache {work.kv_dtype}"
                  + (f", {gb(work.reserve_bytes)} GB reserved per device" if work.reserve_bytes else ""))
    console.print(f"devices: {devices}")
    table = Table(title="Memory per precision (GB)", title_justify="left")
    for col in ("quant", "weights", "KV", "activ.", "overh.", "total", "fits", "min free", "tok/s ≤"):
        table.add_column(col, justify="left" if col in ("quant", "fits") else "right", no_wrap=True)
    for s in plan.schemes:
        fits = "[green]yes[/]" if s.fits and not s.offload else (
            "[yellow]offload[/]" if s.offload else "[red]no[/]")
        name = f"[bold]{s.quant}[/] ★" if s.quant == plan.recommended else s.quant
        table.add_row(name, gb(s.weights_bytes), gb(s.kv_cache_bytes), gb(s.activation_bytes), gb(s.overhead_bytes),
                      gb(s.total_bytes), fits, gb(s.tightest.free_bytes), f"{s.decode_tok_s_upper_bound:,.1f}")
    console.print(table)
    runtimes: dict[str, list[str]] = {}
    for s in plan.schemes:
        runtimes.setdefault(RUNTIME_NAMES[s.engine], []).append(s.quant)
    if len(runtimes) == 1:
        console.print(f"planned for {next(iter(runtimes))}")
    else:
        console.print("planned for " + "; ".join(f"{name} ({', '.join(qs)})" for name, qs in runtimes.items()))
    shown = plan.scheme(plan.recommended) if plan.recommended else plan.schemes[0]
    if len(plan.devices) > 1 or shown.offload:
        _render_devices(shown, console)
    for s in plan.schemes:  # the headroom of every fitting scheme is in --json; here, what to act on
        if s.quant == plan.recommended or not s.fits or s.offload:
            for line in s.advice:
                console.print(f"  {s.quant}: {line}")
    if plan.recommended:
        console.print(f"[bold green]recommended:[/] --quant {plan.recommended}")
    else:
        console.print("[bold red]nothing fits[/]: see the advice above")


def _render_devices(s: SchemePlan, console: Console) -> None:
    table = Table(title=f"Split for {s.quant} (GB)", title_justify="left")
    for col in ("device", "layers", "weights", "KV", "activ.", "overh.", "total", "free"):
        table.add_column(col, justify="left" if col in ("device", "layers") else "right", no_wrap=True)
    for d in s.per_device + ((s.offload,) if s.offload else ()):
        free = "" if d.device.kind == "cpu" and s.offload is d else gb(d.free_bytes)
        table.add_row(device_id(d.device), _layers(d), gb(d.weights_bytes),
                      gb(d.kv_cache_bytes), gb(d.activation_bytes), gb(d.overhead_bytes), gb(d.total_bytes), free)
    console.print(table)
