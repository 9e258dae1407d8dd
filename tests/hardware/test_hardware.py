"""The GPU catalog, the --gpus and --reserve grammars, and local detection (no GPU needed)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from heavylift.hardware import detect
from heavylift.errors import GpuSpecError
from heavylift.hardware.gpus import (
    GENERIC_GPU_BANDWIDTH_BYTES_S,
    SPEC_EXAMPLES,
    _normalize,
    cpu_device,
    find_gpu,
    gpu_catalog,
    parse_bytes,
    parse_gpu_spec,
)

GiB = 1024**3
MiB = 1024**2
SRC = Path(__file__).resolve().parents[2] / "src"

# Catalog memory, written out: torch's total_memory for the H100 (measured), CUDA deviceQuery
# for the A100s, nvidia-smi MiB x 1,048,576 for the rest.
H100_BYTES = 85_017_493_504
A100_40_BYTES = 42_298_834_944
A100_80_BYTES = 84_987_740_160
RTX4090_BYTES = 24_564 * MiB
H200_BYTES = 143_771 * MiB


@pytest.mark.parametrize(
    ("spec", "count", "name", "memory"),
    [
        ("4xA100-80GB", 4, "A100-80GB", A100_80_BYTES),
        ("8xRTX4090", 8, "RTX-4090", RTX4090_BYTES),
        ("2xH200", 2, "H200-141GB", H200_BYTES),
        ("H100", 1, "H100-80GB", H100_BYTES),
        (" 2 x h100 ", 2, "H100-80GB", H100_BYTES),
        ("1x4090", 1, "RTX-4090", RTX4090_BYTES),
        ("3×L40S", 3, "L40S", 47_576_711_168),
        ("2xNVIDIA GeForce RTX 3090", 2, "RTX-3090", 24_576 * MiB),
        ("1xA100-SXM4-40GB", 1, "A100-40GB", A100_40_BYTES),
    ],
)
def test_catalog_specs_give_count_name_and_memory(spec, count, name, memory):
    devices = parse_gpu_spec(spec)
    assert len(devices) == count
    assert [d.index for d in devices] == list(range(count))
    assert {(d.name, d.kind, d.memory_bytes, d.total_bytes) for d in devices} == {
        (name, "cuda", memory, memory)
    }


def test_mixed_spec_keeps_order_and_indices():
    devices = parse_gpu_spec("1xH100,1xA100-40GB,2xRTX-4090")
    assert [(d.index, d.name) for d in devices] == [
        (0, "H100-80GB"), (1, "A100-40GB"), (2, "RTX-4090"), (3, "RTX-4090"),
    ]
    assert [d.memory_bytes for d in devices] == [H100_BYTES, A100_40_BYTES] + [RTX4090_BYTES] * 2
    assert [d.native_fp8 for d in devices] == [True, False, True, True]
    assert devices[1].compute_capability == (8, 0) and devices[1].bf16_supported


@pytest.mark.parametrize(("spec", "name", "memory"), [
    ("2x48GB", "48GB", 48_000_000_000),  # GB is 10^9 bytes, as in --reserve
    ("2 x 48 gb", "48GB", 48_000_000_000),
    ("2x48GiB", "48GiB", 48 * GiB),
    ("2x48G", "48GiB", 48 * GiB),  # a bare G is binary, as in --reserve
    ("2x1.5TB", "1.5TB", 1_500_000_000_000),
    ("2x49140MiB", "49140MiB", 49_140 * MiB),
])
def test_generic_card_sizes_read_as_reserve_sizes(spec, name, memory):
    devices = parse_gpu_spec(spec)
    assert [d.index for d in devices] == [0, 1]
    card = devices[0]
    assert card.name == name and card.kind == "cuda"
    assert card.memory_bytes == card.total_bytes == memory == parse_bytes(spec.split("x", 1)[1])
    assert card.bandwidth_bytes_s == GENERIC_GPU_BANDWIDTH_BYTES_S
    assert not card.native_fp8 and card.bf16_supported and card.compute_capability is None


@pytest.mark.parametrize("spec", ["2x48GB", "1x24GiB", "3x1.5TB", "1x0.5GB", "2x16G"])
def test_a_generic_card_name_parses_back_to_the_same_card(spec):
    card = parse_gpu_spec(spec)[0]
    again = parse_gpu_spec(f"3x{card.name}")[0]  # as advice prints it: "use --gpus 3x48GB"
    assert (again.name, again.memory_bytes) == (card.name, card.memory_bytes)


def test_catalog_names_with_sizes_are_cards_not_sizes():
    """The GPU catalog's memory figures come from data/gpus.json, untouched by the size grammar."""
    assert parse_gpu_spec("1xA100-40GB")[0].memory_bytes == A100_40_BYTES
    assert parse_gpu_spec("1x4090")[0].name == "RTX-4090"  # a bare number is a model number


def test_apple_spec_uses_the_metal_share_of_unified_memory():
    (mac,) = parse_gpu_spec("M2-Ultra")
    assert mac.kind == "mps" and mac.compute_capability is None and not mac.native_fp8
    assert mac.total_bytes == 192 * GiB
    assert mac.memory_bytes == 144 * GiB  # 75% that Metal wires by default


@pytest.mark.parametrize(
    "spec", ["", "   ", "0xH100", "3xFoo", "x", "4xH100,,", "-1xH100", "65xH100", "40xH100,25xL4",
             "2x0GB", "2x0.1B", "4x", "2x48XB"],
)
def test_bad_specs_show_the_grammar_on_one_line(spec):
    with pytest.raises(GpuSpecError) as caught:
        parse_gpu_spec(spec)
    message = str(caught.value)
    assert SPEC_EXAMPLES in message
    assert "H100-80GB" in message  # the known cards are listed
    assert "\n" not in message


def test_closest_names_are_suggested():
    with pytest.raises(GpuSpecError, match="did you mean H100-80GB"):
        find_gpu("H10")
    with pytest.raises(GpuSpecError, match="did you mean A100-40GB or A100-80GB"):
        parse_gpu_spec("2xA100")


def test_far_names_list_every_card():
    with pytest.raises(GpuSpecError) as caught:
        find_gpu("Voodoo5")
    assert all(model.key in str(caught.value) for model in gpu_catalog())


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("h100_sxm", "H100-80GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("rtx 4090", "RTX-4090"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("NVIDIA A10G", "A10G"),
        ("Apple M3 Ultra", "M3-Ultra-512GB"),
    ],
)
def test_find_gpu_ignores_case_spacing_and_vendor(name, key):
    assert find_gpu(name).key == key


def test_catalog_names_are_unambiguous_and_complete():
    owner: dict[str, str] = {}
    for model in gpu_catalog():
        for name in (model.key, model.name, *model.aliases):
            assert owner.setdefault(_normalize(name), model.key) == model.key, name
    assert len(gpu_catalog()) == 13
    for model in gpu_catalog():
        assert model.memory_bytes > 0 and model.bandwidth_bytes_s > 0
        assert (model.kind == "mps") == (model.compute_capability is None)
        assert 0 < model.usable_memory_fraction <= 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GiB),
        ("2GB", 2_000_000_000),
        ("512MiB", 512 * MiB),
        ("512mb", 512_000_000),
        ("1.5G", 1536 * MiB),
        ("1.5GiB", 1536 * MiB),
        (" 3 gib ", 3 * GiB),
        ("1048576", 1_048_576),
        ("0", 0),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "junk", "-2GiB", "-1", "2 XB", "1.5", "GiB", "2GiB2"])
def test_parse_bytes_rejects_junk(text):
    with pytest.raises(GpuSpecError, match="2GiB, 512MiB"):
        parse_bytes(text)


def test_cpu_device():
    cpu = cpu_device(64 * GiB)
    assert (cpu.name, cpu.kind, cpu.index) == ("CPU", "cpu", 0)
    assert cpu.memory_bytes == cpu.total_bytes == 64 * GiB
    assert cpu.bf16_supported and not cpu.native_fp8 and cpu.bandwidth_bytes_s > 0


def test_parse_nvidia_smi_uses_free_memory_of_a_busy_gpu():
    # GPU 0 is idle (559 MiB used, under the 1 GiB threshold): its catalog total, which is what
    # CUDA reports and below nvidia-smi's 81559 MiB. GPU 1 has 41559 MiB used by another job.
    text = "NVIDIA H100 80GB HBM3, 81559, 81000\nNVIDIA H100 80GB HBM3, 81559, 40000\n\n"
    idle, busy = detect._parse_nvidia_smi(text)
    assert (idle.index, busy.index) == (0, 1)
    assert idle.memory_bytes == H100_BYTES
    assert busy.memory_bytes == busy.free_bytes == 40_000 * MiB
    assert idle.total_bytes == busy.total_bytes == 81_559 * MiB
    assert idle.name == "NVIDIA H100 80GB HBM3" and idle.native_fp8
    assert idle.compute_capability == (9, 0) and idle.bandwidth_bytes_s == 3.35e12


def test_parse_nvidia_smi_unknown_card_gets_generic_figures_and_real_memory():
    (card,) = detect._parse_nvidia_smi("Tesla V100-SXM2-16GB, 16160, 16150\n")
    assert card.memory_bytes == card.total_bytes == 16_160 * MiB
    assert card.bandwidth_bytes_s == GENERIC_GPU_BANDWIDTH_BYTES_S and not card.native_fp8


def test_parse_nvidia_smi_without_memory_says_use_gpus():
    with pytest.raises(GpuSpecError, match="--gpus"):
        detect._parse_nvidia_smi("NVIDIA GB10, [N/A], [N/A]\n")


def test_apple_device_from_ram():
    mac = detect._apple_device("Apple M3 Ultra", 256 * GiB)
    assert (mac.kind, mac.total_bytes, mac.memory_bytes) == ("mps", 256 * GiB, 192 * GiB)
    assert mac.bandwidth_bytes_s == 819e9


def test_parse_meminfo():
    text = "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n"
    assert detect._parse_meminfo(text) == 20_000_000 * 1024
    assert detect._parse_meminfo("MemTotal: 5 kB\n") is None


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or platform.system() == "Darwin",
    reason="this machine has a GPU",
)
def test_detection_without_gpus_gives_the_cpu():
    (device,) = detect.detect_devices()
    assert device.kind == "cpu" and device.index == 0
    assert device.memory_bytes > 0


def test_hardware_modules_import_without_torch():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    code = "import sys, heavylift.hardware.gpus, heavylift.hardware.detect; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
