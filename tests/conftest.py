"""Test setup: CPU backend with 8 fake devices, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_runtest_teardown(item, nextitem):
    """Drops compiled executables after each test file. XLA:CPU maps every executable's code
    into memory, and a whole suite's worth passes the kernel's limit on memory maps per
    process (65,530 by default), after which compiling crashes."""
    if nextitem is None or nextitem.path != item.path:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES
