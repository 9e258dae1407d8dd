"""How a plan is shown to a person: its tables and advice (the JSON contract is planner/contract.py)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from heavylift.defaults import GB, SERVE_MAX_SEQS, GiB
from heavylift.hardware.gpus import MAX_GPU_COUNT, Device
from heavylift.model.architecture import Architecture
from heavylift.planner.contract import device_id
from heavylift.planner.fewest import Fewest
from heavylift.planner.memory import FAST, TRANSFORMERS
from heavylift.planner.plan import DevicePlan, Plan, SchemePlan, Workload
from heavylift.planner.training import TrainingDevicePlan, TrainingPlan


# How the report names the runtime a plan describes.
RUNTIME_NAMES = {FAST: "heavylift's engine", TRANSFORMERS: "transformers' forward"}


# Columns when output goes to a file or a pipe: wide enough that no table or line is ever broken mid-entry
# (rich would otherwise assume 80).
PIPED_WIDTH = 10_000
# The report's tables count in GB (10^9 bytes), as the advice does; a device's memory is also shown in
# GiB (2^30), the unit its name uses: an "80GB" H100 holds 79.2 GiB, 85.0 GB.
TABLE_UNIT = "GB"
# What the planner's activation_bytes hold: everything the caching allocator keeps beyond weights, KV cache
# and buffers at the run's peak - blocks the load leaves cached as well as each step's scratch.
TRANSIENT_COLUMN = "transient"
# With --serve: the column of SchemePlan.max_concurrent_sequences, the most sequences of the context served at once.
SERVES_COLUMN = "serves"


def console(stderr: bool = False) -> Console:
    """A console for the report: the terminal's width on a terminal, unbroken lines anywhere else."""
    out = Console(stderr=stderr, highlight=False, soft_wrap=True)
    return out if out.is_terminal else Console(stderr=stderr, highlight=False, soft_wrap=True, width=PIPED_WIDTH)


def cell(nbytes: float) -> str:
    """A table cell in the table's unit (GB), without the unit: the column title carries it."""
    return f"{nbytes / GB:,.1f}"


def memory_label(nbytes: int) -> str:
    """A device's memory in its name's unit and in the tables': "79.2 GiB = 85.0 GB"."""
    return f"{nbytes / GiB:,.1f} GiB = {cell(nbytes)} {TABLE_UNIT}"


def _layers(d: DevicePlan | TrainingDevicePlan) -> str:
    return f"{d.layers.start}-{d.layers.stop - 1}" if d.layers else "-"


def _same_card(a: Device, b: Device) -> bool:
    return (a.name, a.memory_bytes, a.total_bytes) == (b.name, b.memory_bytes, b.total_bytes)


def devices_line(devices: tuple[Device, ...]) -> str:
    """The devices, neighbours of one card told once: "8 x H100-80GB (#0-#7), 79.2 GiB = 85.0 GB each"."""
    groups: list[list[Device]] = []
    for d in devices:
        if groups and _same_card(groups[-1][-1], d):
            groups[-1].append(d)
        else:
            groups.append([d])
    parts = []
    for group in groups:
        first, last = group[0], group[-1]
        which = f"{first.name} (#{first.index})" if len(group) == 1 else \
            f"{len(group)} x {first.name} (#{first.index}-#{last.index})"
        memory = memory_label(first.memory_bytes)
        if first.memory_bytes != first.total_bytes:  # Apple's GPU share, or what a busy GPU has free
            memory += f" usable of {first.total_bytes / GiB:,.1f} GiB"
        parts.append(f"{which}, {memory}" + (" each" if len(group) > 1 else ""))
    return "; ".join(parts)


def _print_model(model: str, arch: Architecture, work: Workload, console: Console) -> None:
    """The report's first lines: the model and the workload."""
    console.print(f"[bold]{model}[/] ({arch.model_type}, {arch.params:,} parameters, {arch.num_layers} layers)")
    console.print(f"context {work.context:,} tokens x {_batch(work.batch, work.serve)}, KV cache {work.kv_dtype}"
                  + (f", {cell(work.reserve_bytes)} {TABLE_UNIT} reserved per device" if work.reserve_bytes else ""))


def render(plan: Plan, console: Console) -> None:
    arch, work = plan.architecture, plan.workload
    _print_model(plan.model, arch, work, console)
    console.print(f"devices: {devices_line(plan.devices)}")
    table = Table(title=f"Memory per precision ({TABLE_UNIT} = 10^9 bytes)", title_justify="left")
    columns = ("quant", "weights", "KV", TRANSIENT_COLUMN, "overh.", "total", "fits", "min free", "tok/s ≤")
    for col in columns + ((SERVES_COLUMN,) if work.serve else ()):
        table.add_column(col, justify="left" if col in ("quant", "fits") else "right", no_wrap=True)
    for s in plan.schemes:
        fits = "[green]yes[/]" if s.fits and not s.offload else (
            "[yellow]offload[/]" if s.offload else "[red]no[/]")
        name = f"[bold]{s.quant}[/] ★" if s.quant == plan.recommended else s.quant
        row = [name, cell(s.weights_bytes), cell(s.kv_cache_bytes), cell(s.activation_bytes), cell(s.overhead_bytes),
               cell(s.total_bytes), fits, cell(s.tightest.free_bytes), f"{s.decode_tok_s_upper_bound:,.1f}"]
        table.add_row(*row, *((str(s.max_concurrent_sequences),) if work.serve else ()))
    console.print(table)
    console.print(runtimes_line([(s.quant, s.engine) for s in plan.schemes]))
    shown = plan.scheme(plan.recommended) if plan.recommended else plan.schemes[0]
    if len(plan.devices) > 1 or shown.offload:
        _render_devices(shown, console)
    for s in plan.schemes:  # the headroom of every fitting scheme is in --json; here, what to act on
        if s.quant == plan.recommended or not s.fits or s.offload:
            for line in s.advice:
                console.print(f"  {s.quant}: {line}")
            if s.quant == plan.recommended and work.serve:
                console.print(f"  {s.quant}: {serves_line(s, work.context)}")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if plan.recommended:
        console.print(f"[bold green]recommended:[/] --quant {plan.recommended}")
    else:
        console.print("[bold red]nothing fits[/]: see the advice above")


def runtimes_line(engines: list[tuple[str, str]]) -> str:
    """Which runtime the figures describe, given each precision's (quant, engine): one name when they share it."""
    runtimes: dict[str, list[str]] = {}
    for quant, engine in engines:
        runtimes.setdefault(RUNTIME_NAMES[engine], []).append(quant)
    if len(runtimes) == 1:
        return f"planned for {next(iter(runtimes))}"
    return "planned for " + "; ".join(f"{name} ({', '.join(qs)})" for name, qs in runtimes.items())


def fewest_cell(count: int | None, weights_only: int | None) -> str:
    """One card's entry of the fewest table: the fewest cards that hold the model, then (in brackets) the cards
    its weights alone fill; "-" where the reserve leaves the card nothing."""
    if weights_only is None:
        return "-"
    return f"{count if count is not None else f'>{MAX_GPU_COUNT}'} ({weights_only})"


def render_fewest(table: Fewest, console: Console) -> None:
    """`heavylift plan --fewest`: a row per precision, a column per catalog card."""
    arch, work = table.architecture, table.workload
    _print_model(table.model, arch, work, console)
    grid = Table(title="Fewest cards that hold it without offload (in brackets: the cards its weights alone fill)",
                 title_justify="left")
    grid.add_column("quant", justify="left", no_wrap=True)
    for card in table.cards:
        grid.add_column(card.name, justify="right", no_wrap=True)
    for row in table.rows:
        grid.add_row(row.quant, *(fewest_cell(n, w) for n, w in zip(row.counts, row.weights_only)))
    console.print(grid)
    console.print(runtimes_line([(row.quant, row.engine) for row in table.rows]))


def _batch(batch: int, serve: bool) -> str:
    """The workload's batch: sequences decoded together, or (--serve) the server's sequences."""
    if not serve:
        return f"batch {batch}"
    return f"{batch} sequence{'s' if batch != 1 else ''} served at once"


def serves_line(s: SchemePlan, context: int) -> str:
    """How many sequences of the context a precision serves at once (SchemePlan.max_concurrent_sequences)."""
    n = s.max_concurrent_sequences
    return (f"serves up to {n} sequence{'s' if n != 1 else ''} of {context:,} tokens at once"
            + (" (the most counted)" if n == SERVE_MAX_SEQS else ""))


def _render_devices(s: SchemePlan, console: Console) -> None:
    table = Table(title=f"Split for {s.quant} ({TABLE_UNIT})", title_justify="left")
    for col in ("device", "layers", "weights", "KV", TRANSIENT_COLUMN, "overh.", "total", "free"):
        table.add_column(col, justify="left" if col in ("device", "layers") else "right", no_wrap=True)
    for d in s.per_device + ((s.offload,) if s.offload else ()):
        free = "" if d.device.kind == "cpu" and s.offload is d else cell(d.free_bytes)
        table.add_row(device_id(d.device), _layers(d), cell(d.weights_bytes),
                      cell(d.kv_cache_bytes), cell(d.activation_bytes), cell(d.overhead_bytes), cell(d.total_bytes), free)
    console.print(table)


# The training table's columns after device and layers: (title, TrainingDevicePlan field).
TRAINING_COLUMNS = (("base", "weights_bytes"), ("adapters", "adapter_bytes"), ("grads", "gradient_bytes"),
                    ("optim.", "optimizer_bytes"), ("activ.", "activation_bytes"), ("logits", "logits_bytes"),
                    ("overh.", "overhead_bytes"), ("total", "total_bytes"), ("free", "free_bytes"))


def render_training(plan: TrainingPlan, console: Console) -> None:
    """`heavylift plan MODEL --train`: the model, the training step, a row per device at its peak, the advice."""
    arch, work = plan.architecture, plan.training
    console.print(f"[bold]{plan.model}[/] ({arch.model_type}, {arch.params:,} parameters, {arch.num_layers} layers)")
    console.print(f"QLoRA on a {plan.quant} base: LoRA r {work.lora_r} (alpha {work.lora_alpha:g}, dropout "
                  f"{work.lora_dropout:g}) on {','.join(work.targets)}, {plan.trainable_params:,} trainable parameters")
    console.print(f"seq-len {work.seq_len:,} x micro-batch {work.micro_batch}, gradient checkpointing "
                  f"{'on' if work.grad_checkpointing else 'off'}, {work.optimizer}"
                  + (f", {cell(plan.reserve_bytes)} {TABLE_UNIT} reserved per device" if plan.reserve_bytes else ""))
    console.print(f"devices: {devices_line(plan.devices)}")
    table = Table(title=f"Memory per device at its peak in a training step ({TABLE_UNIT} = 10^9 bytes)",
                  title_justify="left")
    for col in ("device", "layers", *(title for title, _ in TRAINING_COLUMNS), "peak"):
        table.add_column(col, justify="left" if col in ("device", "layers", "peak") else "right", no_wrap=True)
    for d in plan.per_device:
        table.add_row(device_id(d.device), _layers(d), *(cell(getattr(d, field)) for _, field in TRAINING_COLUMNS),
                      d.peak if d.layers else "-")
    console.print(table)
    for line in plan.advice:
        console.print(f"  {escape(line)}")
    if plan.fits:
        console.print("[bold green]fits[/]: step one and every step after it")
    else:
        console.print("[bold red]does not fit[/]: see the advice above")
