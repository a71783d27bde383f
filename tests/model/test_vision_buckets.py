"""The vision tower on media padded to a patch-count bucket equals it on the exact grids."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from kimi_jax.model.vision import (
    MoonViT,
    VisionConfig,
    encode_media,
    pad_media,
    project_bucketed,
)
from kimi_jax.testing.compiles import compilations
from kimi_jax.testing.synthetic import TINY_TEXT, TINY_VISION, k25_config


@pytest.fixture(scope="module")
def model():
    """The tiny MoonViT (16 x 16 position table) with random weights of std 0.1 (LayerNorm
    scales around 1): large enough that every stage matters."""
    cfg = VisionConfig.from_dict(k25_config(TINY_TEXT, TINY_VISION)["vision_config"])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoonViT(cfg, dtype=jnp.float32)))
    rng = np.random.default_rng(1)
    weights = {
        path: (float(path[-1] == "weight" and len(x.shape) == 1) + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
        for path, x in traverse_util.flatten_dict(state.to_pure_dict()).items()
    }
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(weights))
    return nnx.merge(graphdef, state)


@nnx.jit
def bucketed(model, pixels, layout):
    return project_bucketed(model.vision_tower, model.mm_projector, pixels, layout)


# One image; two images of different grids (down- and upsampled table); video chunks of 2 and 4
# frames beside the table's own size, in a bucket with room to spare.
CASES = [([(1, 6, 4)], 32), ([(1, 4, 8), (1, 20, 18)], 512), ([(2, 4, 6), (1, 16, 16), (4, 2, 2)], 512)]


@pytest.mark.parametrize("grids,bucket", CASES)
def test_bucketed_equals_exact_grids(model, grids, bucket):
    patches = sum(t * h * w for t, h, w in grids)
    pixels = np.random.default_rng(patches).normal(size=(patches, 3, 14, 14)).astype(np.float32)
    want = np.asarray(encode_media(model, pixels, np.array(grids)))
    got = np.asarray(bucketed(model, *pad_media(pixels, grids, model.cfg, bucket)))
    assert got.shape == (bucket // 4, want.shape[1]) and np.abs(want).max() > 0.1
    print(f"max |bucketed - exact| = {np.abs(got[: len(want)] - want).max():.1e}, max |exact| {np.abs(want).max():.1f}")
    np.testing.assert_allclose(got[: len(want)], want, rtol=0, atol=1e-5)


def test_one_program_per_bucket(model):
    """After the first media in a bucket, media of other grids and counts compile nothing."""
    rng = np.random.default_rng(0)

    def run(grids):
        patches = sum(t * h * w for t, h, w in grids)
        return bucketed(model, *pad_media(rng.normal(size=(patches, 3, 14, 14)), grids, model.cfg, 32))

    run([(1, 4, 4)])
    with compilations() as compiled:
        for grids in ([(1, 2, 6), (2, 2, 2)], [(1, 4, 8)], [(4, 2, 2), (1, 2, 2)]):
            run(grids)
    assert compiled == []
    with pytest.raises(ValueError, match="media of 36 patches .* do not fit a bucket of 32 patches"):
        pad_media(np.zeros((36, 3, 14, 14)), [(1, 6, 6)], model.cfg, 32)
