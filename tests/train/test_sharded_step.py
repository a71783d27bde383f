"""Sharded train steps on the 8-device meshes equal the single-device step."""

import jax
import numpy as np
import pytest

from kimi_jax.parallel.placement import Parallel
from kimi_jax.train import OptimizerConfig, StepConfig, Trainer

pytestmark = pytest.mark.mesh

CASES = [("adamw", "data=2,expert=2,tensor=2"), ("muon", "data=1,expert=8,tensor=1")]


LR, STEPS = 1e-2, 3


def _run(make_model, make_batch, parallel, optimizer):
    trainer = Trainer(make_model(parallel=parallel), OptimizerConfig(name=optimizer, learning_rate=LR),
                      StepConfig(balance_loss=1e-3, bias_update_rate=1e-3))
    metrics = [trainer.step(make_batch(seed=s, B=8)) for s in range(STEPS)]
    return metrics, jax.tree.map(np.asarray, trainer.state["model"])


@pytest.mark.parametrize("optimizer, mesh", CASES)
def test_sharded_steps_equal_the_single_device(make_model, make_batch, optimizer, mesh):
    metrics, params = _run(make_model, make_batch, None, optimizer)
    sharded_metrics, sharded = _run(make_model, make_batch, Parallel.create(mesh), optimizer)
    for key in ("loss", "grad_norm", "balance_loss"):
        np.testing.assert_allclose([m[key] for m in sharded_metrics], [m[key] for m in metrics], rtol=1e-5,
                                   err_msg=key)
    # Adam and Muon normalize the gradient, so an element whose gradient is about 0 may step
    # by up to the learning rate either way with the summation order: a few such elements
    # may differ by that much, every other one agrees.
    flat, flat_sharded = jax.tree.leaves_with_path(params), jax.tree.leaves(sharded)
    for (path, a), b in zip(flat, flat_sharded, strict=True):
        close = np.isclose(b, a, rtol=1e-4, atol=1e-5)
        assert close.mean() >= 0.99, (jax.tree_util.keystr(path), close.mean())
        assert np.abs(b - a).max() <= 2 * LR * STEPS, jax.tree_util.keystr(path)
