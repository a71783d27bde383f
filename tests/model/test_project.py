"""``kimi_jax.model.layers.project``: a projection whose weight may come as a run's whole stack."""

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model.layers import project, projections

# The projections a cached step reads in place: q down / up, o_proj (two contracted axes), an MLP's.
SPECS = [
    ("btd,dq->btq", (2, 1, 64), (64, 32)),
    ("btq,qnk->btnk", (2, 1, 32), (32, 2, 16)),
    ("btnv,nvd->btd", (3, 1, 2, 16), (2, 16, 64)),
    ("...d,df->...f", (5, 64), (64, 32)),
]


def _draw(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("spec, x_shape, w_shape", SPECS)
def test_a_stack_gives_its_layer(spec, x_shape, w_shape):
    x, stack = _draw(0, *x_shape), _draw(1, 3, *w_shape)
    np.testing.assert_array_equal(np.asarray(project(spec, x, stack[1])), np.asarray(jnp.einsum(spec, x, stack[1])))
    want = jnp.einsum(spec, x, stack[2])
    np.testing.assert_array_equal(np.asarray(project(spec, x, stack, jnp.int32(2))), np.asarray(want))
    # the in-place kernel's path (what NVIDIA GPUs run), in Pallas' interpreter
    got = project(spec, x, stack, jnp.int32(2), interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_float32_output_is_the_router_reference():
    """``out_dtype=float32`` (the router): bf16 inputs give the float32 einsum of their float32
    values, whole, sliced from a stack, and in place by the kernel (its bf16 products are exact)."""
    spec = "td,de->te"
    x, stack = _draw(2, 3, 64).astype(jnp.bfloat16), _draw(3, 3, 64, 48).astype(jnp.bfloat16)
    want = np.asarray(jnp.einsum(spec, x.astype(jnp.float32), stack[2].astype(jnp.float32), precision="highest"))
    for got in (project(spec, x, stack[2], out_dtype=jnp.float32),
                project(spec, x, stack, jnp.int32(2), out_dtype=jnp.float32),
                project(spec, x, stack, jnp.int32(2), out_dtype=jnp.float32, interpret=True)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_projections_of_one_input():
    """Several projections of one input (the router's float32 logits, the shared experts' gate
    and up): each equals its own ``project``, whole, sliced from stacks, and in one launch of
    the in-place kernel."""
    x = _draw(4, 2, 1, 64).astype(jnp.bfloat16)
    stacks = [_draw(5 + i, 3, 64, n).astype(jnp.bfloat16) for i, n in enumerate((48, 32, 32))]
    dtypes = (jnp.float32, None, None)
    want = [project("btd,dn->btn", x, w[1], out_dtype=d) for w, d in zip(stacks, dtypes, strict=True)]
    for got in (projections(x, [w[1] for w in stacks], out_dtypes=dtypes),
                projections(x, stacks, jnp.int32(1), out_dtypes=dtypes),
                projections(x, stacks, jnp.int32(1), out_dtypes=dtypes, interpret=True)):
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                       rtol=1e-6 if g.dtype == jnp.float32 else 1e-2, atol=1e-6)
