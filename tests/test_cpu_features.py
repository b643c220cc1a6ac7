"""The CPU's flags that every benchmark figure records (and bfloat16 loading checks), read from /proc/cpuinfo."""

import sys
from pathlib import Path

import torch

from modeling_vitgpt2.utils.cpu_features import RELEVANT_FLAGS, cpu_flags, has_fast_bfloat16, relevant_cpu_flags

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_flags_are_read_from_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags(cpuinfo)
    assert {"avx2", "avx512f", "avx512_vnni"} <= flags and "amx_tile" not in flags
    assert relevant_cpu_flags(flags) == {flag: flag in {"avx2", "avx512f", "avx512_vnni"} for flag in RELEVANT_FLAGS}
    assert not has_fast_bfloat16(flags)
    assert has_fast_bfloat16(flags | {"avx512_bf16"}) and has_fast_bfloat16(flags | {"amx_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: nothing known, nothing claimed


def test_every_benchmark_records_the_cpu_flags():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import describe_machine
    finally:
        sys.path.remove(str(BENCHMARKS))
    machine = describe_machine(torch.device("cpu"))
    assert machine["cpu_flags"] == relevant_cpu_flags()
    assert set(machine["cpu_flags"]) == set(RELEVANT_FLAGS)
