"""Which precision is fast on this machine: ``precision: auto`` (``svhn.fit``,
``svhn.predict --precision auto``) and the notice when bf16 would run emulated.

bf16 autocast is several times faster than float32 on CPUs with AVX512-BF16 or AMX and on
GPUs with bf16 (Ampere and newer); on a CPU without them PyTorch emulates bf16 and a training step
runs many times slower than in float32 (docs/performance.md). A recipe that hard-codes
``bf16-mixed`` is then the slowest choice, so the recipes ask for ``auto``. An explicit
precision is always used as given.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["AUTO", "auto_precision", "cpu_bf16_flags", "cpu_name", "cpuinfo_value",
           "emulated_bf16_notice", "machine"]

AUTO = "auto"
# /proc/cpuinfo flags of the instructions that make bf16 fast on a CPU
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_value(key: str, cpuinfo: Path = _CPUINFO) -> str | None:
    """The first CPU's ``key`` field in /proc/cpuinfo (``model name``, ``flags``, ...); None
    where there is none (not Linux). Stops reading at that line."""
    if not cpuinfo.is_file():
        return None
    with cpuinfo.open(errors="replace") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def cpu_bf16_flags(cpuinfo: Path = _CPUINFO) -> list[str]:
    """The bf16 instruction flags this CPU reports (empty where it has none, or where the
    OS does not say: not Linux)."""
    flags = set((cpuinfo_value("flags", cpuinfo) or "").split())
    return [flag for flag in _CPU_BF16_FLAGS if flag in flags]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else what the platform says)."""
    return cpuinfo_value("model name") or platform.processor() or platform.machine()


def machine(device_type: str = "cpu") -> dict[str, object]:
    """The machine a figure was measured on, as the result files name it: its ``class``
    (``gpu``, ``cpu-bf16`` where bf16 runs natively, else ``cpu-no-bf16``), the GPU's or
    the CPU's ``name`` (with its bf16 flags) and the CPU ``cores``."""
    cpu = cpu_name()
    flags = cpu_bf16_flags()
    if device_type == "cuda" and torch.cuda.is_available():
        kind, name = "gpu", torch.cuda.get_device_name()
    else:
        kind = "cpu-bf16" if flags else "cpu-no-bf16"
        name = f"{cpu} ({', '.join(flags) or 'no AVX512-BF16 or AMX'})"
    return {"class": kind, "name": name, "cores": os.cpu_count()}


def _on_cuda(accelerator: str) -> bool:
    return accelerator in ("cuda", "gpu") or (accelerator == "auto"
                                              and torch.cuda.is_available())


def _on_cpu(accelerator: str) -> bool:
    return accelerator in ("cpu", "auto") and not _on_cuda(accelerator)


def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """What ``precision: auto`` means on this machine for ``accelerator`` (as the Trainer
    takes it): the precision and a sentence saying why."""
    if _on_cuda(accelerator):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed", "this GPU computes bf16 natively"
        return "16-mixed", "this GPU has no fast bf16; float16 autocast with loss scaling"
    if not _on_cpu(accelerator):
        return "32-true", f"accelerator {accelerator!r}: float32, which every device has"
    flags = cpu_bf16_flags()
    if flags:
        return "bf16-mixed", f"this CPU has {' and '.join(flags)}"
    where = "this CPU has no AVX512-BF16 or AMX" if _CPUINFO.is_file() else \
        f"this {platform.system()} machine does not say whether its CPU has fast bf16"
    return "32-true", f"{where}: bf16 would be emulated, many times slower than float32"


def emulated_bf16_notice(precision: str, accelerator: str = "auto", *, fix: str) -> str | None:
    """A sentence ending in ``fix`` when ``precision`` asks for bf16 on a CPU that would
    emulate it; else None. Said, never acted on: the precision asked for is the one used."""
    if not str(precision).startswith("bf16") or not _on_cpu(accelerator) or cpu_bf16_flags():
        return None
    return f"bf16 on this CPU (no AVX512-BF16 or AMX) is emulated, many times slower than " \
           f"float32: {fix}"
