"""Benchmarks that ship with the package (``kimi-jax bench``): the measured hardware floors
(``floors``: memory bandwidth, matmul rate, JSON-line records), one MoE layer at Kimi K2.5's
sizes against them (``moe``), and profile kernels traced back to their source lines
(``hlo_sources``)."""
