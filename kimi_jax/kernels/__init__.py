"""Pallas and library kernels, each with a pure-JAX reference and a CPU interpret-mode test."""
