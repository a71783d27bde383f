"""The hardware catalog (``hardware.toml`` beside this module, with each entry's source)."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources

FIELDS = ("name", "memory_gb", "hbm_gb_s", "bf16_tflops", "int8_tflops", "interconnect_gb_s", "cross_host_gb_s",
          "devices_per_host", "device_kinds")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator as the planner sees it: memory, bandwidths and matmul rates per device
    (in bytes, bytes/s and FLOP/s), and how many share a host."""

    key: str
    name: str
    memory_bytes: float
    hbm_bytes_s: float
    bf16_flops: float
    int8_flops: float
    interconnect_bytes_s: float
    cross_host_bytes_s: float
    devices_per_host: int
    device_kinds: tuple[str, ...]

    def describe(self) -> str:
        return (f"{self.name}: {self.memory_bytes / 1e9:g} GB at {self.hbm_bytes_s / 1e12:g} TB/s, "
                f"bf16 {self.bf16_flops / 1e12:g} TFLOP/s, int8/fp8 {self.int8_flops / 1e12:g}, "
                f"links {self.interconnect_bytes_s / 1e9:g} GB/s in a host, {self.cross_host_bytes_s / 1e9:g} "
                f"across hosts, {self.devices_per_host} per host")


def catalog() -> dict[str, Hardware]:
    """Every catalog entry by its key (``h200``, ``tpu-v5p``, ...)."""
    table = tomllib.loads((resources.files("kimi_jax.plan") / "hardware.toml").read_text())
    entries = {}
    for key, d in table.items():
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise ValueError(f"hardware catalog entry {key!r} lacks {missing}")
        entries[key] = Hardware(
            key, d["name"], d["memory_gb"] * 1e9, d["hbm_gb_s"] * 1e9, d["bf16_tflops"] * 1e12,
            d["int8_tflops"] * 1e12, d["interconnect_gb_s"] * 1e9, d["cross_host_gb_s"] * 1e9,
            int(d["devices_per_host"]), tuple(d["device_kinds"]),
        )
    return entries


def find_hardware(name: str) -> Hardware:
    """The catalog entry named ``name`` (its key or its name, any case: ``h200``, ``H200 141GB``)."""
    entries = catalog()
    wanted = name.strip().lower()
    for key, hw in entries.items():
        if wanted in (key, hw.name.lower()):
            return hw
    raise ValueError(f"unknown hardware {name!r}; the catalog has {', '.join(entries)}")
