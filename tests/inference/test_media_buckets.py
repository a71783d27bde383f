"""The engine runs the vision tower in patch-count buckets: after warm-up no image compiles
anything, and the tokens equal those of the model run without the engine."""

import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.inference.engine import Engine, default_media_buckets
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.testing.compiles import compilations
from kimi_jax.testing.synthetic import (
    TINY_TEXT,
    TINY_VISION,
    k25_config,
    write_checkpoint,
)

NEW = 4
# Bucket 32: one image, an image beside a 2-frame video chunk. Bucket 64: two images of other
# grids. Two runs (64 + 32): an image filling the largest bucket, then another.
REQUESTS = [[(1, 4, 4)], [(1, 2, 4), (2, 2, 6)], [(1, 6, 4), (1, 4, 8)], [(1, 8, 8), (1, 4, 6)]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("media_buckets")
    src = write_checkpoint(work / "hf", k25_config(TINY_TEXT, TINY_VISION), seed=11, dtype="float32")
    return kimi_jax.load(kimi_jax.convert(src, work / "converted", dtype="float32", progress=False))


def engine(model, **kwargs):
    return Engine(model, **{"max_slots": 3, "max_length": 64, "prefill_chunk": 8, "cache_dtype": jnp.float32,
                            "media_buckets": (32, 64), **kwargs})


def request(model, grids, seed):
    """A prompt with text around each medium's placeholders, and the media's pixels."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, 100, 3).tolist()
    for grid in grids:
        prompt += [model.config.media_placeholder_token_id] * model.vision_config.num_tokens(grid)
        prompt += rng.integers(3, 100, 2).tolist()
    patches = sum(t * h * w for t, h, w in grids)
    return prompt, dict(pixel_values=rng.normal(size=(patches, 3, 14, 14)).astype(np.float32),
                        grid_thws=np.array(grids))


def solo(model, prompt, media):
    """Greedy tokens of the prompt alone through the batch path (exact grids: prefill + decode)."""
    steps = BatchEngine(model)
    logits, cache = steps.prefill([prompt], steps.new_cache(1, 64, jnp.float32), chunk=8, **media)
    tokens = []
    for _ in range(NEW):
        tokens.append(int(jnp.argmax(logits[0])))
        logits, cache = steps.decode(jnp.asarray(tokens[-1:]), cache)
    return tokens


def test_images_compile_nothing_after_warm_up(model):
    requests = [request(model, grids, seed) for seed, grids in enumerate(REQUESTS)]
    eng = engine(model)
    eng.warm_up()
    with compilations() as compiled:
        submitted = [eng.submit(prompt, max_new_tokens=NEW, **media) for prompt, media in requests]
        eng.run()
    assert compiled == []
    assert [r.token_ids for r in submitted] == [solo(model, prompt, media) for prompt, media in requests]


def test_a_medium_larger_than_the_largest_bucket_is_refused(model):
    prompt, media = request(model, [(1, 4, 4), (1, 10, 8)], 0)
    with pytest.raises(ValueError, match=r"medium 1 \(grid \(1, 10, 8\)\) has 80 patches, more than the engine's "
                                         r"largest media bucket \(64 patches; media_buckets=\[32, 64\]\)"):
        engine(model).submit(prompt, **media)


def test_default_buckets(model):
    """Powers of two from 256 to what max_length placeholders of a 4-frame chunk take (2 x 2 merge), at most 32768."""
    vision = model.vision_config
    assert default_media_buckets(vision, 64) == (256, 512, 1024)
    assert default_media_buckets(vision, 4) == (64,)
    assert default_media_buckets(vision, 100_000)[-1] == 32768
    assert engine(model, media_buckets=None).media_buckets == (256, 512, 1024)
