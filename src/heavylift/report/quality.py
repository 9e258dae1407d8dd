"""`heavylift eval`'s report: one table row per precision, a JSON object, and quality against memory (--plot)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from heavylift.errors import InvalidArgumentError
from .plot import FIGURE_INCHES, MARKERS, PLOT_SUFFIXES, save_figure

MEGABYTE = 1e6  # the memory column's unit: tiny models would read 0.0 GB


def _pm(value: float | None, error: float | None, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:{fmt}} ± {error * scale:{fmt}}"


def _plain(value: float | None, fmt: str) -> str:
    return "-" if value is None else f"{value:{fmt}}"


def to_json(evaluation) -> dict:
    return asdict(evaluation)


def render(evaluation, console: Console) -> None:
    e = evaluation
    table = Table(title=f"{e.model}: {e.positions:,} positions of {e.windows} windows of {e.window} tokens, "
                        f"against {e.reference_quant} ({e.reference_runtime})")
    for title in ("precision", "runtime", "PPL", "mean KLD", "KLD p99", "KLD max", "same top %", "RMS Δp %",
                  "memory MB", "decode tok/s ≤"):
        table.add_column(title, justify="left" if title in ("precision", "runtime") else "right")
    for r in e.results:
        name = f"{r.quant} (reference)" if r.reference else r.quant
        table.add_row(name, r.runtime, _pm(r.perplexity, r.perplexity_error, ".3f"),
                      _pm(r.kld_mean, r.kld_error, ".6f"), _plain(r.kld_p99, ".6f"), _plain(r.kld_max, ".6f"),
                      _pm(r.same_top, r.same_top_error, ".2f", 100), _pm(r.rms_dp, r.rms_dp_error, ".3f", 100),
                      _plain(None if r.memory_bytes is None else r.memory_bytes / MEGABYTE, ",.1f"),
                      _plain(r.decode_tok_s_bound, ",.0f"))
    console.print(table)
    console.print(f"text: {e.text}")
    console.print(f"reference saved to {e.reference_file} (reuse it with --reference FILE)")


def check_plot_path(path: Path) -> None:
    """Refuse a --plot name matplotlib cannot write, before any model loads."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidArgumentError(f"--plot wants a {', '.join(PLOT_SUFFIXES)} file name, not {path.name}")


def plot_quality(evaluation, path: Path) -> None:
    """Mean KL divergence (log scale, with its error) against the plan's memory, one point per precision."""
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install 'heavylift[plot]'") from None
    points = [r for r in evaluation.results if not r.reference and r.memory_bytes and r.kld_mean]
    fig, ax = plt.subplots(figsize=FIGURE_INCHES)
    for i, r in enumerate(points):
        ax.errorbar(r.memory_bytes / MEGABYTE, r.kld_mean, yerr=r.kld_error, marker=MARKERS[i % len(MARKERS)],
                    linestyle="none", label=f"{r.quant} ({r.runtime})")
    ax.set_yscale("log")
    ax.set_xlabel("planned memory (MB)")
    ax.set_ylabel(f"mean KL divergence from {evaluation.reference_quant} (nats)")
    ax.set_title(f"{evaluation.model}: quality against memory")
    ax.legend(fontsize=9)
    save_figure(fig, path)
