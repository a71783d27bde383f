"""Synthetic checkpoints (official K2.5 layout, tiny configs) shared by the tests, the demo
and the benchmarks."""
