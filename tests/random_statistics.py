"""Randomised norm statistics for the converted-weight tests (one home: tools/benchmark_common.py,
which the benchmarks use to build the same pairs)."""
from tool_loader import load_tool

randomize_batchnorms = load_tool("benchmark_common").randomize_batchnorms
