"""What `heavylift plan` shows: units a reader can check against the card's name, column names that say what
they count, lines that stay whole when piped, and a plot drawn from the same plans as the table."""

from __future__ import annotations

import heavylift
from heavylift.report.plot import fill_curves

from conftest import run_cli


def _line(out: str, start: str) -> str:
    (found,) = [line for line in out.splitlines() if line.startswith(start)]
    return found


def test_devices_show_their_memory_in_gib_and_in_the_tables_gb(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "8xH100")
    assert code == 0 and _line(out, "devices:") == "devices: 8 x H100-80GB (#0-#7), 79.2 GiB = 85.0 GB each"
    assert "Memory per precision (GB = 10^9 bytes)" in out
    code, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "1xH100,1xA100-40GB")
    assert _line(out, "devices:") == "devices: H100-80GB (#0), 79.2 GiB = 85.0 GB; A100-40GB (#1), 39.4 GiB = 42.3 GB"


def test_a_generic_card_reads_gb_as_decimal_and_gib_as_binary(capsys):
    _, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "2x48GB")
    assert _line(out, "devices:") == "devices: 2 x 48GB (#0-#1), 44.7 GiB = 48.0 GB each"
    _, out, _ = run_cli(capsys, "plan", "llama3.1-8b", "--gpus", "2x48GiB", "--reserve", "2GB")
    assert _line(out, "devices:") == "devices: 2 x 48GiB (#0-#1), 48.0 GiB = 51.5 GB each"
    assert _line(out, "context").endswith(", 2.0 GB reserved per device")


def test_the_transient_column_is_named_for_what_it_holds(capsys):
    _, out, _ = run_cli(capsys, "plan", "llama3.1-70b", "--gpus", "1xH100,1xA100-40GB")
    headers = [line for line in out.splitlines() if "weights" in line]
    assert len(headers) == 2 and all("transient" in h and "activ" not in h for h in headers)


def test_output_that_is_not_a_terminal_never_wraps(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama3.1-405b", "--gpus", "8xH100")
    lines = out.splitlines()
    assert code == 0 and "planned for heavylift's engine (bf16, fp8, int8, nf4, nf4-dq, fp4); transformers' forward (fp16)" \
        in lines
    assert "  bf16: use --gpus 10xH100-80GB: the fewest of these that hold bf16 at this context" in lines


def test_the_plot_plans_each_precision_on_the_runtime_the_table_used():
    # fp16 is planned on transformers' forward, every other precision on heavylift's engine.
    plan = heavylift.plan("llama3.1-8b", gpus="1xH100")
    assert {s.engine for s in plan.schemes} == {"fast", "transformers"}
    curves = fill_curves(plan, [plan.context])
    for s in plan.schemes:
        (device,) = s.per_device
        assert curves[s.quant] == [device.total_bytes / device.capacity_bytes]


def test_the_plot_shows_a_fit_on_mixed_cards_below_the_capacity_line():
    # int8 puts more on the H100 than the A100 holds, yet fits: each card is measured against its own memory.
    plan = heavylift.plan("llama3.1-70b", gpus="1xH100,1xA100-40GB", quant="int8")
    (scheme,) = plan.schemes
    h100, a100 = scheme.per_device
    assert scheme.fits and h100.total_bytes > a100.capacity_bytes
    (fill,) = fill_curves(plan, [plan.context])["int8"]
    assert fill == max(h100.total_bytes / h100.capacity_bytes, a100.total_bytes / a100.capacity_bytes) < 1
