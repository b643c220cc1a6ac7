"""What this CPU's vector units offer, as Linux reports it in /proc/cpuinfo's `flags`: which int8 and bfloat16
kernels can run fast here, to record beside every benchmark figure and to refuse a bfloat16 load on a CPU that would
emulate it (tens of times slower than float32)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CPUINFO", "RELEVANT_FLAGS", "cpu_flags", "has_fast_bfloat16", "relevant_cpu_flags"]

CPUINFO = Path("/proc/cpuinfo")
# Wide vectors (avx2, avx512f), int8 dot products (avx512_vnni, avx_vnni, amx_int8), bfloat16 dot products
# (avx512_bf16, amx_bf16) and AMX's tile registers (amx_tile), which oneDNN's fastest kernels use.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """Every flag of the first CPU listed; empty where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return frozenset()


def relevant_cpu_flags(flags: frozenset[str] | None = None) -> dict[str, bool]:
    """`RELEVANT_FLAGS`, each present or not: what a benchmark records beside its figures."""
    flags = cpu_flags() if flags is None else flags
    return {flag: flag in flags for flag in RELEVANT_FLAGS}


def has_fast_bfloat16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU multiplies bfloat16 in hardware (avx512_bf16 or AMX); elsewhere torch emulates it."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)
