"""The machine in words (CPU model, cores, the flags that pick oneDNN's kernels), for cards, bench tables and
CI logs: float32 and bf16 results round differently between CPU kinds, so every figure names its kind."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: the CPU flags that decide which bf16 / fp32 kernels oneDNN picks (and so how sums round)
KERNEL_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """The CPU in words: model name, cores this process may use, and its bf16 / AMX flags (Linux
    /proc/cpuinfo; "unknown" elsewhere). Every figure and every CI log names it."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    return {
        "model": model,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
    }


def cpu_line() -> str:
    """`cpu_description` in one line: "2-core Intel(R) Xeon(R) Processor (avx512f avx512_bf16 ...)"."""
    cpu = cpu_description()
    return f"{cpu['cpus']}-core {cpu['model']} ({' '.join(cpu['flags']) or 'no bf16 / AMX flags'})"
