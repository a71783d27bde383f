"""Multi-process (multi-host) start-up through JAX's own runtime, ``jax.distributed``."""

from __future__ import annotations

import os

import jax

ENV = {
    "coordinator": "KIMI_JAX_COORDINATOR",
    "num_processes": "KIMI_JAX_NUM_PROCESSES",
    "process_id": "KIMI_JAX_PROCESS_ID",
}


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process run; returns whether one was started.

    Arguments default to ``KIMI_JAX_COORDINATOR`` (``host:port`` of process 0),
    ``KIMI_JAX_NUM_PROCESSES`` and ``KIMI_JAX_PROCESS_ID``. With none of them set nothing
    happens (one process), unless JAX's own cluster detection applies (Slurm, TPU pods),
    which ``jax.distributed.initialize()`` handles when called without arguments; call it
    yourself in that case. Must run before anything touches a JAX device.
    """
    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    num_processes = num_processes or _int_env("num_processes")
    process_id = process_id if process_id is not None else _int_env("process_id")
    if coordinator is None and num_processes is None and process_id is None:
        return False
    missing = [k for k, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(
            f"multi-process start needs coordinator, num_processes and process_id; missing {missing} "
            f"(flags --coordinator/--num-processes/--process-id or env {', '.join(ENV.values())})"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def _int_env(key: str) -> int | None:
    value = os.environ.get(ENV[key])
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ENV[key]}={value!r} is not an integer") from None
