"""Inference: the engine (cached prefill and decode steps), sampling, and ``generate``
(conversations in, parsed replies out)."""
