"""Export the serving engine's steps with ``jax.export`` (:mod:`kimi_jax.export.steps`) and run
them again without the model code (:mod:`kimi_jax.export.loader`)."""
