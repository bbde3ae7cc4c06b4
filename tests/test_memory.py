"""Peak memory: a cached step with B=256 (chunks of 8 sequences) needs <= 1.5x the memory of a plain step with B=8.

Each step runs in a fresh subprocess (tests/helpers_model.py memory worker). Right before the step the kernel's
peak-RSS mark is reset (/proc/self/clear_refs); the compared quantity is the step's own increase: VmHWM after the
step minus VmRSS before it (model, batch, imports and warmed thread pools are in place then). Peaks (baseline
included) are compared too. A sanity check shows the measurement
sees activations: a plain step with B=32 needs several times what the cached B=256 step needs.
"""
from __future__ import annotations

from helpers_model import measure_memory

MIB = 2**20


def test_cached_b256_peak_memory_within_1_5x_of_plain_b8():
    plain8 = measure_memory("plain", 8, chunk_size=8)
    cached256 = measure_memory("cached", 256, chunk_size=8)
    plain32 = measure_memory("plain", 32, chunk_size=8)
    report = (
        f"step memory (peak RSS - RSS before the step): plain B=8 {plain8['delta'] / MIB:.0f} MiB, "
        f"cached B=256 {cached256['delta'] / MIB:.0f} MiB, plain B=32 {plain32['delta'] / MIB:.0f} MiB; "
        f"absolute peaks {plain8['peak'] / MIB:.0f} / {cached256['peak'] / MIB:.0f} / {plain32['peak'] / MIB:.0f} MiB"
    )
    print(report)
    assert cached256["tokens"] > 25 * plain8["tokens"], "the cached step must really process a 32x larger batch"
    assert cached256["chunks"] == 160  # 256 * (1 + 1 + 3) sequences / 8
    assert cached256["peak_reset"], "could not reset the peak-RSS mark; the measurement would include start-up"
    assert cached256["delta"] <= 1.5 * plain8["delta"], report
    assert cached256["peak"] <= 1.5 * plain8["peak"], report
    # the measurement is sensitive to activation memory: 4x the plain batch costs several times more
    assert plain32["delta"] >= 2.5 * cached256["delta"], report
    assert plain32["delta"] >= 2.5 * plain8["delta"], report
