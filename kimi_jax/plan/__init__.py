"""Deployment planning: the hardware catalog (``hardware``), measured efficiencies from the
benchmark results (``measured``) and the planner (``planner``): whether a model fits a
number of devices, bytes per device under a mesh layout, KV cache room, and roofline or
measured decode and prefill speeds."""

from kimi_jax.plan.hardware import Hardware, catalog, find_hardware
from kimi_jax.plan.planner import Plan, Request, kv_bytes_per_token, plan

__all__ = ["Hardware", "Plan", "Request", "catalog", "find_hardware", "kv_bytes_per_token", "plan"]
