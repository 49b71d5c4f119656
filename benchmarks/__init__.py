"""Benchmark suite: this machine's ceilings, then training, generation, vision and memory of Qwen-VL-shaped models.

Run from the repository root: `python -m benchmarks` (see benchmarks/RESULTS.md).
"""
