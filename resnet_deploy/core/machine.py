"""The machine behind every figure: CPU model, its INT8 instructions, GPU, package versions.

INT8 accuracy and speed on x86 depend on the CPU, not only on the model. onnxruntime's
uint8 x int8 kernels multiply and add pairs of products in one instruction; without VNNI
(``vpmaddubsw``) the pair sum is held in int16 and saturates above 32767, so an 8-bit-weight
model loses accuracy on AVX2 and AVX-512 (non-VNNI) CPUs. With VNNI or AMX
(``vpdpbusd``/``tdpbusd``) the sum goes straight to int32. ``int8_path`` names which case
this CPU is, so every report says which kind of machine its INT8 figures came from.

/proc/cpuinfo is read directly: py-cpuinfo (the usual library) has had no release since
2022 and spawns a subprocess to probe CPUID, which costs about a second per command.
"""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

from .. import __version__

Int8Path = Literal["amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "other"]

# Most capable first: the first rule whose flags are all present names the path.
INT8_PATHS: tuple[tuple[Int8Path, frozenset[str]], ...] = (
    ("amx", frozenset({"amx_int8", "amx_tile"})),
    ("avx512-vnni", frozenset({"avx512_vnni"})),
    ("avx-vnni", frozenset({"avx_vnni"})),
    ("avx512", frozenset({"avx512bw"})),
    ("avx2", frozenset({"avx2"})),
)
# Paths whose uint8 x int8 dot products accumulate in int32: no saturation with 8-bit weights.
VNNI_PATHS: frozenset[str] = frozenset({"amx", "avx512-vnni", "avx-vnni"})
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile",
                     "amx_int8", "f16c", "fma")
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnx", "torch", "numpy", "onnxsim", "onnxslim",
            "pillow", "click")


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def int8_path(flags: frozenset[str]) -> Int8Path:
    """Which INT8 kernel family onnxruntime's x86 code picks on a CPU with these flags."""
    for name, needed in INT8_PATHS:
        if needed <= flags:
            return name
    return "other"


def saturates(path: str) -> bool:
    """True where uint8 x int8 pair sums pass through int16 (8-bit weights lose accuracy)."""
    return path not in VNNI_PATHS


@functools.lru_cache(maxsize=1)
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model, the flags that matter for inference, and the INT8 path ("other" off x86 Linux)."""
    try:
        model, flags = parse_cpuinfo(Path(cpuinfo).read_text(errors="replace"))
    except OSError:
        model, flags = "", frozenset()
    return {"cpu": model or platform.processor() or platform.machine() or "unknown CPU",
            "cores": os.cpu_count(),
            "flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
            "int8_path": int8_path(flags)}


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the figures depend on (installed ones only)."""
    versions = {"resnet_deploy": __version__, "python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The first NVIDIA GPU and its driver, from nvidia-smi; None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def machine_info() -> dict[str, Any]:
    """The ``machine`` object of every command's JSON: CPU, INT8 path, GPU, versions."""
    info = {**cpu_info(), "platform": platform.platform(), "versions": package_versions()}
    gpu = gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """One line for table headers: ``AMD EPYC, 2 cores, int8 path avx2``."""
    info = info or cpu_info()
    gpu = f"; GPU {info['gpu']}" if info.get("gpu") else ""
    return f"{info['cpu']}, {info['cores']} cores, int8 path {info['int8_path']}{gpu}"
