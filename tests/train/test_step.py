"""The train step: loss, optimizers, QK-clip, bias update, finite differences, resume, LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.model.layers import Quantized
from kimi_jax.train.checkpoint import latest_step
from kimi_jax.train.forward import forward
from kimi_jax.train.loop import fit
from kimi_jax.train.loss import next_token_loss
from kimi_jax.train.optim import OptimizerConfig
from kimi_jax.train.step import StepConfig, Trainer


def test_forward_equals_the_model(model, batch):
    out = forward(model.language_model, jnp.asarray(batch["inputs"]), remat=True, max_logits=True)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(model(batch["inputs"])), rtol=1e-5, atol=1e-5)
    runs = model.config.text.layer_runs  # a dense layer, then the MoE layers: routing per MoE run
    assert len(out.routing) == 1 and out.routing[0].idx.shape == (runs[1][1], 48, 2)
    assert [m.shape[0] for m in out.max_logits] == [count for _, count in runs]


def test_prompt_tokens_are_masked():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    loss, n = next_token_loss(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]))
    assert float(n) == 1 and float(loss) == pytest.approx(np.log(2))


def test_a_few_steps_reduce_the_loss(model, batch):
    """AdamW with rematerialized layers (Muon's loss falls in the resume test)."""
    trainer = Trainer(model, OptimizerConfig(name="adamw", learning_rate=3e-3), StepConfig(remat=True))
    losses = [trainer.step(batch)["loss"] for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_qk_clip_caps_attention_logits(model, batch):
    ids = jnp.asarray(batch["inputs"])
    before = np.stack(forward(model.language_model, ids, max_logits=True).max_logits)
    tau = float(np.median(before))
    trainer = Trainer(model, OptimizerConfig(name="muon", learning_rate=1e-9, clip_norm=0),
                      StepConfig(qk_clip=tau, bias_update_rate=0))
    trainer.step(batch)
    after = np.stack(forward(trainer.model.language_model, ids, max_logits=True).max_logits)
    np.testing.assert_allclose(after, np.minimum(before, tau), rtol=1e-3)


def test_bias_update_moves_load_toward_balance(batch, make_model):
    skewed = make_model()
    gate = skewed.language_model.runs[-1].mlp.gate  # the MoE layers' routers, stacked
    gate.weight[...] = gate.weight[...].at[:, :, 0].add(0.5)  # expert 0 is everyone's first choice
    trainer = Trainer(skewed, OptimizerConfig(learning_rate=1e-9), StepConfig(bias_update_rate=0.02))
    ratios = [trainer.step(batch)["max_load_ratio"] for _ in range(25)]
    bias = np.asarray(trainer.model.language_model.layer(1).mlp.gate.e_score_correction_bias[...])
    assert ratios[-1] <= 0.8 * ratios[0], ratios
    assert bias[0] == bias.min() < 0


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def test_gradients_equal_finite_differences(model, batch):
    """The directional derivative of the loss (with the balance loss) along a random direction."""
    ids = jnp.asarray(batch["inputs"])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        out = forward(m.language_model, ids)
        return next_token_loss(out.logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"]))[0]

    def routing(p):
        return [np.asarray(r.idx) for r in forward(nnx.merge(graphdef, p, rest).language_model, ids).routing]

    grads = jax.grad(loss)(params)
    leaves, tree = jax.tree.flatten(params)
    eps = 1e-3
    for seed in range(10):  # a direction whose steps of eps keep every routing choice (the loss is smooth there)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        random = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        # half along the gradient, so the derivative stands well above float32's rounding of the
        # loss; the routers' weights stay put (moving them along their gradient flips choices)
        direction = jax.tree.map(lambda r, g: r / _norm(random) + g / _norm(grads), random, grads)
        direction = nnx.State.from_flat_path({
            path: var.replace(jnp.zeros_like(var[...]) if "gate" in path and path[-1] == "weight" else var[...])
            for path, var in nnx.to_flat_state(direction)})
        direction = jax.tree.map(lambda d, n=_norm(direction): d / n, direction)
        ends = [jax.tree.map(lambda p, d, s=s: p + s * eps * d, params, direction) for s in (1, -1)]
        if all(np.array_equal(a, b) for end in ends for a, b in zip(routing(end), routing(params), strict=True)):
            break
    else:
        pytest.fail("no direction keeps the routing")
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    shifted = [loss(end) for end in ends]
    numeric = float(shifted[0] - shifted[1]) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=2e-2)


def test_resume_continues_bit_for_bit(model, tmp_path, make_batch):
    def batch_at(step):  # one batch: the losses of different batches are too noisy to fall in 4 steps
        return make_batch(seed=0)

    config = (OptimizerConfig(name="muon", learning_rate=3e-3, warmup_steps=2, decay_steps=4), StepConfig(qk_clip=5.0))
    whole = Trainer(model, *config)
    losses = [r["loss"] for r in fit(whole, batch_at, 4, log_every=1, progress=False)]
    assert losses[-1] < losses[0], losses  # Muon, with QK-clip
    first = Trainer(model, *config)
    fit(first, batch_at, 2, out=tmp_path, progress=False)
    assert latest_step(tmp_path) == 2
    resumed = Trainer(model, *config)
    logged = fit(resumed, batch_at, 4, out=tmp_path, log_every=1, progress=False)
    assert [r["step"] for r in logged] == [3, 4]
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), whole.state, resumed.state)
    assert all(jax.tree.leaves(same))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all('"loss"' in line for line in lines)  # steps 2 (logged at the end), 3, 4


def test_lora_leaves_frozen_weights_untouched(batch, make_model):
    """Dense weights (attention, shared and dense MLPs, router) and INT4 routed experts alike."""
    model = make_model("int4")
    trainer = Trainer(model, OptimizerConfig(learning_rate=1e-2), StepConfig(bias_update_rate=0), lora=4)
    losses = [trainer.step(batch)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    frozen = nnx.state(model, nnx.Any(nnx.Param, Quantized))
    after = nnx.state(trainer.model, nnx.Any(nnx.Param, Quantized))
    for (path, a), (_, b) in zip(nnx.to_flat_state(frozen), nnx.to_flat_state(after), strict=True):
        assert np.array_equal(np.asarray(a[...]), np.asarray(b[...])), path
    merged = trainer.merged_model()
    q = merged.language_model.layer(0).self_attn.q_a_proj[...]
    assert not np.array_equal(np.asarray(q), np.asarray(model.language_model.layer(0).self_attn.q_a_proj[...]))


def test_bad_batch_is_refused(model, batch):
    trainer = Trainer(model)
    with pytest.raises(ValueError, match="lacks"):
        trainer.step({k: v for k, v in batch.items() if k != "weights"})
