"""`--plot`: how full each precision leaves the fullest device, against context length.

Each precision is planned at every context as the table plans it: on the runtime its SchemePlan names
(SchemePlan.engine), with the same devices, batch and reserve. The y axis is a device's fill - what the
plan puts on it over its capacity (its memory less --reserve) - so that with cards of different sizes
one line, 100%, is every card's limit: a curve below it fits on every device.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from heavylift.defaults import CONTEXT_STEPS
from heavylift.errors import InvalidArgumentError
from heavylift.hardware.gpus import Device
from heavylift.planner.plan import Plan, SchemePlan, layout

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
FIGURE_INCHES = (9, 5.5)
# Markers and dashes told apart when two precisions plan alike (bf16 and fp16, nf4 and fp4).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")
Y_HEADROOM = 1.08  # room above the highest curve or the capacity line for its label


def _fill(s: SchemePlan) -> float:
    """The fullest device's share of its capacity."""
    return max(d.total_bytes / d.capacity_bytes for d in s.per_device)


def plot_contexts(plan: Plan) -> list[int]:
    """The contexts drawn: the usual steps up to the model's maximum, and the plan's own."""
    limit = max(plan.architecture.max_position_embeddings, plan.context)
    return sorted({c for c in CONTEXT_STEPS if c <= limit} | {plan.context})


def fill_curves(plan: Plan, contexts: list[int]) -> dict[str, list[float]]:
    """Each precision's fill of its fullest device at each context, planned as the plan planned it."""
    curves = {}
    for s in plan.schemes:
        lay = layout(plan.architecture, s.quant)
        curves[s.quant] = [_fill(lay.plan(plan.devices, replace(plan.workload, context=c, engine=s.engine)))
                           for c in contexts]
    return curves


def _tokens(context: int) -> str:
    return f"{context // 1024}k" if context % 1024 == 0 else f"{context:,}"


def _cards(devices: tuple[Device, ...]) -> str:
    """ "8 x H100-80GB" or "1 x H100-80GB + 1 x A100-40GB"."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.name] = counts.get(d.name, 0) + 1
    return " + ".join(f"{n} x {name}" for name, n in counts.items())


def _capacity_axis(ax, plan: Plan) -> None:
    """Where every device has one capacity, a second axis reads the fill in GB."""
    capacities = {d.memory_bytes - plan.workload.reserve_bytes for d in plan.devices}
    if len(capacities) != 1:
        return
    capacity_gb = capacities.pop() / 1e9
    axis = ax.secondary_yaxis("right", functions=(lambda f: f * capacity_gb / 100, lambda g: g * 100 / capacity_gb))
    axis.set_ylabel("GB on that device")


def save_figure(fig, path: Path) -> None:
    """Lay `fig` out, write it to `path` (a file that cannot be written is the user's one-line mistake) and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise InvalidArgumentError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def plot_memory(plan: Plan, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install 'heavylift[plot]'") from None
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidArgumentError(f"--plot wants a {', '.join(PLOT_SUFFIXES)} file name, not {path.name}")
    contexts = plot_contexts(plan)
    fig, ax = plt.subplots(figsize=FIGURE_INCHES)
    curves = fill_curves(plan, contexts)
    for i, (quant, fills) in enumerate(curves.items()):
        ax.plot(contexts, [100 * f for f in fills], marker=MARKERS[i % len(MARKERS)],
                linestyle=DASHES[i % len(DASHES)], label=quant)
    ax.axhline(100, color="black", linewidth=1.5)
    reserve = " less --reserve" if plan.workload.reserve_bytes else ""
    ax.annotate(f"capacity: each device's memory{reserve}", xy=(0.01, 100), xycoords=("axes fraction", "data"),
                xytext=(0, 3), textcoords="offset points", va="bottom", fontsize=8)
    ax.axvline(plan.context, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    steps = [c for c in contexts if c in CONTEXT_STEPS]  # the plan's own context is the dotted line
    ax.set_xticks(steps, [_tokens(c) for c in steps])
    ax.minorticks_off()
    ax.set_xlabel(f"context (tokens); dotted: --context {plan.context:,}")
    ax.set_ylabel("fullest device, % of its capacity")
    highest = max([100.0] + [100 * f for fills in curves.values() for f in fills])
    ax.set_ylim(0, highest * Y_HEADROOM)
    _capacity_axis(ax, plan)
    ax.set_title(f"{plan.model}: batch {plan.batch} on {_cards(plan.devices)}")
    ax.legend(title="precision", loc="upper left", bbox_to_anchor=(1.12, 1), fontsize=9)
    save_figure(fig, path)
