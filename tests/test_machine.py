"""machine_info(): the CPU's INT8 path, read from sample /proc/cpuinfo texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_deploy.core.machine import (cpu_info, describe, int8_path, machine_info, parse_cpuinfo,
                                        saturates)

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 popcnt"


def cpuinfo(model: str, flags: str) -> str:
    """Two processors, as the kernel prints them; only the first one is read."""
    block = (f"processor\t: {{n}}\nvendor_id\t: X\nmodel name\t: {model}\n"
             f"flags\t\t: {BASE} {flags}\nbogomips\t: 4000.00\n\n")
    return block.format(n=0) + block.format(n=1)


SAMPLES = [
    ("Intel(R) Xeon(R) Platinum 8480+ (Sapphire Rapids)",
     "avx2 fma avx512f avx512bw avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8", "amx"),
    ("Intel(R) Xeon(R) Gold 6248 (Cascade Lake)", "avx2 fma avx512f avx512bw avx512_vnni",
     "avx512-vnni"),
    ("AMD EPYC 9654 (Zen 4)", "avx2 fma avx512f avx512bw avx512_vnni avx_vnni", "avx512-vnni"),
    ("12th Gen Intel(R) Core(TM) i7-12700 (Alder Lake)", "avx2 fma avx_vnni", "avx-vnni"),
    ("Intel(R) Xeon(R) Gold 6148 (Skylake-SP)", "avx2 fma avx512f avx512bw avx512cd",
     "avx512"),
    ("AMD EPYC 7763 64-Core Processor (Zen 3)", "avx2 fma f16c", "avx2"),
    ("Intel(R) Xeon(R) CPU E5-2680 v2 (Ivy Bridge)", "avx f16c", "other"),
    # AMX tiles without the int8 instructions are not the int8 AMX path.
    ("AMX bf16-only part", "avx2 avx512f avx512bw avx512_vnni amx_tile amx_bf16",
     "avx512-vnni"),
]


@pytest.mark.parametrize("model, flags, expected", SAMPLES)
def test_int8_path_from_sample_cpuinfo(model: str, flags: str, expected: str) -> None:
    name, parsed = parse_cpuinfo(cpuinfo(model, flags))
    assert name == model
    assert int8_path(parsed) == expected
    assert saturates(expected) == (expected not in ("amx", "avx512-vnni", "avx-vnni"))


def test_non_x86_and_unreadable_cpuinfo_are_other(tmp_path: Path) -> None:
    arm = ("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull "
           "sha1 sha2 crc32 atomics asimddp\nCPU implementer\t: 0x41\n")
    assert int8_path(parse_cpuinfo(arm)[1]) == "other"
    path = tmp_path / "cpuinfo"
    path.write_text(arm)
    info = cpu_info(str(path))
    assert info["int8_path"] == "other" and info["flags"] == [] and info["cpu"]
    assert cpu_info(str(tmp_path / "missing"))["int8_path"] == "other"


def test_cpu_info_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo("AMD EPYC 7763 64-Core Processor", "avx2 fma"))
    info = cpu_info(str(path))
    assert info["cpu"] == "AMD EPYC 7763 64-Core Processor"
    assert info["int8_path"] == "avx2" and info["flags"] == ["avx2", "fma"]
    assert describe({**info, "cores": 2}) == \
        "AMD EPYC 7763 64-Core Processor, 2 cores, int8 path avx2"


def test_machine_info_of_this_machine() -> None:
    info = machine_info()
    assert info["int8_path"] in ("amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "other")
    assert info["cpu"] and info["cores"] >= 1 and isinstance(info["flags"], list)
    assert {"onnxruntime", "numpy", "python", "resnet_deploy"} <= info["versions"].keys()
    assert info == machine_info()  # one answer per process
