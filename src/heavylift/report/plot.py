"""`--plot`: each precision's memory on the fullest device against context length, with capacity lines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from heavylift.defaults import CONTEXT_STEPS
from heavylift.errors import InvalidArgumentError
from heavylift.planner.plan import Plan, layout


def plot_memory(plan: Plan, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install 'heavylift[plot]'") from None
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InvalidArgumentError(f"--plot wants a .png, .svg or .pdf file name, not {path.name}")
    limit = max(plan.architecture.max_position_embeddings, plan.context)
    contexts = sorted({c for c in CONTEXT_STEPS if c <= limit} | {plan.context})
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in plan.schemes:
        lay, work = layout(plan.architecture, s.quant), replace(plan.workload, engine=s.engine)
        peaks = [max(d.total_bytes for d in lay.plan(plan.devices, replace(work, context=c)).per_device)
                 for c in contexts]
        ax.plot(contexts, [p / 1e9 for p in peaks], marker="o", label=s.quant)
    for cap in sorted({d.memory_bytes - plan.workload.reserve_bytes for d in plan.devices}):
        names = ", ".join(d.name for d in plan.devices if d.memory_bytes - plan.workload.reserve_bytes == cap)
        ax.axhline(cap / 1e9, linestyle="--", color="grey")
        ax.annotate(f"{names[:40]} capacity", (contexts[0], cap / 1e9), va="bottom", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("GB on the fullest device")
    ax.set_title(f"{plan.model}: batch {plan.batch} on {len(plan.devices)} device(s)")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise InvalidArgumentError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
