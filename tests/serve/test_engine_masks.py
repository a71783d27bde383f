"""Token constraints in the engine: masks applied on the device, per slot, without
disturbing the other requests or compiling after warm-up."""

import numpy as np

from kimi_jax.inference.engine import Engine


class Forced:
    """Allows exactly the next token of ``script``, then anything."""

    def __init__(self, script, vocab_size):
        self.script, self.vocab_size, self.seen = list(script), vocab_size, []

    def mask(self):
        if len(self.seen) >= len(self.script):
            return None
        bits = np.zeros(-(-self.vocab_size // 32) * 32, bool)
        bits[self.script[len(self.seen)]] = True
        return np.packbits(bits, bitorder="little").view(np.uint32)

    def accept(self, token):
        self.seen.append(token)


def test_constrained_and_free_requests_together(model, shape):
    vocab = model.config.text.vocab_size
    engine = Engine(model, **shape)  # the served engine's shapes: the session compiles its steps once
    prompts = [[5, 9, 300, 41], [7, 7, 7], [100, 200, 300, 400, 500, 17]]
    alone = []
    for prompt in prompts:
        request = engine.submit(prompt, max_new_tokens=8)
        engine.run()
        alone.append(request.token_ids)

    def batch():
        forced = Forced([3, 1, 4, 1, 5, 9], vocab)
        sampled = Forced([600, 2], vocab)  # sampling at temperature 1 still keeps to the mask
        requests = [engine.submit(prompts[0], max_new_tokens=8),
                    engine.submit(prompts[1], max_new_tokens=8, constraint=forced),
                    engine.submit(prompts[2], max_new_tokens=8),
                    engine.submit(prompts[2], max_new_tokens=4, temperature=1.0, seed=3, constraint=sampled)]
        engine.run()
        assert requests[0].token_ids == alone[0] and requests[2].token_ids == alone[2]
        assert requests[1].token_ids[:6] == forced.script and forced.seen == requests[1].token_ids
        assert requests[3].token_ids[:2] == [600, 2] and sampled.seen == requests[3].token_ids

    batch()
    warm = engine.stats()["compilations"]
    batch()
    assert engine.stats()["compilations"] == warm

    again = engine.submit(prompts[1], max_new_tokens=8)  # a slot that held a mask is free of it
    engine.run()
    assert again.token_ids == alone[1]
