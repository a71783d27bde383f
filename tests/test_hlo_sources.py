"""``kimi_jax.bench.hlo_sources``: kernels of a profile traced back to JAX operations and lines."""

import inspect

import jax
import jax.numpy as jnp

from kimi_jax.bench.hlo_sources import kernel_name, kernel_sources, module_sources


def _scaled_sine(x):
    return jnp.sin(x) * 3.0


def _step(x):
    return jnp.sort(_scaled_sine(x)) + x.sum()


def _optimized_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_instructions_name_their_operation_and_line():
    text = _optimized_text(_step, jnp.arange(8.0))
    sources = module_sources(text)
    line = inspect.getsourcelines(_step)[1] + 1  # the line of jnp.sort
    assert any(v.startswith("sort @ ") and v.endswith(f"test_hlo_sources.py:{line} (_step)")
               for v in sources.values()), sources
    # every fused instruction is named as its kernel would be: no dots or dashes
    assert all("." not in k and "-" not in k for k in sources)


def test_older_metadata_with_source_file_and_line():
    text = ('  %input_reduce_fusion.3 = f32[8]{0} fusion(%p), kind=kInput, calls=%fused, metadata={op_name='
            '"jit(decode_step)/while/body/reduce_sum" source_file="/site/kimi_jax/model/norm.py" source_line=41}\n'
            '  ROOT %copy-start.2 = f32[8]{0} copy-start(%x), metadata={op_name="jit(f)/copy"}\n')
    assert module_sources(text) == {"input_reduce_fusion_3": "reduce_sum @ kimi_jax/model/norm.py:41",
                                    "copy_start_2": "copy"}
    assert kernel_name("gemm_fusion_dot.13") == "gemm_fusion_dot_13"


def test_kernel_sources_takes_the_module_that_explains_the_profile(tmp_path):
    step = _optimized_text(_step, jnp.arange(8.0))
    other = _optimized_text(lambda x: jnp.cos(x), jnp.arange(8.0))
    (tmp_path / "module_0001.jit_step.cpu_after_optimizations.txt").write_text(step)
    (tmp_path / "module_0002.jit_step.cpu_after_optimizations.txt").write_text(other)
    (tmp_path / "module_0001.jit_step.cpu_after_optimizations-buffer-assignment.txt").write_text("not HLO")
    names = [k for k in module_sources(step) if k.startswith("sort")] + ["int4_grouped_matmul"]
    found = kernel_sources(tmp_path, names, "jit_step")
    assert set(found) == set(names[:-1])  # a Pallas kernel's name is no instruction's
    assert found == {name: module_sources(step)[name] for name in names[:-1]}
    cos = [k for k, v in module_sources(other).items() if v.startswith("cos @ ")]
    assert cos and kernel_sources(tmp_path, cos, "jit_step") == {k: module_sources(other)[k] for k in cos}
    assert kernel_sources(tmp_path, names, "no_such_module") == {}
