"""The serving engine: continuous batching over slots, sampling on the device, prefix reuse."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.inference.engine import Engine, decode_step
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.testing.compiles import compilations
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config, write_checkpoint

LENGTHS = [7, 3, 12, 5, 9, 1]
NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("serving")
    src = write_checkpoint(work / "hf", k25_config(TINY_TEXT, multimodal=False), seed=11, dtype="float32")
    return kimi_jax.load(kimi_jax.convert(src, work / "converted", dtype="float32", progress=False))


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(4)
    return [rng.integers(0, model.config.text.vocab_size, n).tolist() for n in LENGTHS]


def engine(model, **kwargs):
    return Engine(model, **{"max_slots": 3, "max_length": 64, "prefill_chunk": 4, "cache_dtype": jnp.float32,
                            **kwargs})


@pytest.fixture(scope="module")
def solo(model, prompts):
    """Each prompt's greedy tokens, run alone through the batch path (prefill + decode)."""
    steps = BatchEngine(model)
    out = []
    for prompt in prompts:
        cache = steps.new_cache(1, 64, jnp.float32)
        logits, cache = steps.prefill([prompt], cache, chunk=4)
        tokens = []
        for _ in range(NEW):
            tokens.append(int(jnp.argmax(logits[0])))
            logits, cache = steps.decode(jnp.asarray(tokens[-1:]), cache)
        out.append(tokens)
    return out


@pytest.mark.parametrize("buckets", [None, (1, 2, 3), (1, 3)])
def test_requests_admitted_at_different_steps_equal_solo(model, prompts, solo, buckets):
    """Whatever decode bucket computes a request's step (default: every slot; one bucket per count;
    one for a single row)."""
    eng = engine(model, decode_buckets=buckets)
    requests = []
    for step, prompt in enumerate(prompts):  # one new request per step, more requests than slots
        requests.append(eng.submit(prompt, max_new_tokens=NEW))
        for _ in range(step % 3):
            eng.step()
    eng.run()
    assert [r.token_ids for r in requests] == solo
    assert all(r.done and r.finish_reason == "length" for r in requests)
    stats = eng.stats()
    assert stats["free_slots"] == 3 and stats["running"] == 0
    assert stats["decoded_tokens"] == NEW * len(prompts)


@pytest.mark.parametrize("burst", [1, 3])
def test_decode_bursts_equal_single_steps(model, prompts, solo, burst):
    """Decode steps run in bursts (nothing else scheduled) give the solo tokens and end where a
    stop id or the budget says, mid-burst too."""
    eng = engine(model, decode_burst=burst)
    stop = solo[0][3]
    first = eng.submit(prompts[0], max_new_tokens=NEW, stop_ids=[stop])
    second = eng.submit(prompts[1], max_new_tokens=5)
    eng.run()
    assert first.token_ids == solo[0][: solo[0].index(stop) + 1] and first.finish_reason == "stop"
    assert second.token_ids == solo[1][:5] and second.finish_reason == "length"
    stats = eng.stats()
    assert stats["decoded_tokens"] == len(first.token_ids) + 5 and stats["free_slots"] == 3
    assert stats["decode_steps"] > stats["steps"] - 2 if burst > 1 else stats["decode_steps"] <= stats["steps"]


@pytest.mark.parametrize("burst", [1, 3])
@pytest.mark.parametrize("filtered", [False, True])
def test_decode_programs_never_wait_for_the_host(model, burst, filtered):
    """A compiled decode step has no conditional and no loop of unknown length (on a GPU either
    makes the host wait for the device mid-dispatch, so the next step could not be queued)."""
    eng = engine(model)
    hlo = decode_step.lower(eng._graph, eng.state, eng._slots, np.arange(3, dtype=np.int32),
                            key_block=eng._decode_blocks[3], burst=burst, filtered=filtered).compile().as_text()
    loops = re.findall(r"= .*\bwhile\(.*", hlo)
    assert "conditional(" not in hlo
    assert len(loops) >= 1 + (burst > 1) and all('"known_trip_count"' in loop for loop in loops)


@pytest.mark.parametrize("buckets, match", [((2,), "the largest max_slots"), ((0, 3), "ints in"), ((), "ints in"),
                                            ((1.5, 3), "ints in")])
def test_bad_decode_buckets(model, buckets, match):
    with pytest.raises(ValueError, match=match):
        engine(model, decode_buckets=buckets)


@pytest.mark.parametrize("burst", [0, 2.5])
def test_bad_decode_burst(model, burst):
    with pytest.raises(ValueError, match="decode_burst must be a positive int"):
        engine(model, decode_burst=burst)


@pytest.mark.mesh
def test_split_slots_decode_every_slot(model):
    sharded = kimi_jax.parallel.shard_model(model, "data=2,expert=2,tensor=2")
    assert engine(sharded, max_slots=4).decode_buckets == (4,)
    with pytest.raises(ValueError, match="splits the slots"):
        engine(sharded, max_slots=4, decode_buckets=(1, 4))


@pytest.mark.parametrize("mesh", [None, pytest.param("data=2,expert=2,tensor=2", marks=pytest.mark.mesh)])
def test_no_request_compiles_after_warm_up(model, prompts, mesh):
    """After warm_up, requests of other lengths (one over three chunks), sampling settings,
    seeds, stop ids and budgets, a prefix copied from a busy slot, a cancellation and a second
    turn compile nothing."""
    if mesh is None:
        eng = engine(model)
    else:  # four slots: the slot state is split over the data axis
        eng = engine(kimi_jax.parallel.shard_model(model, mesh), max_slots=4)
    eng.warm_up()
    with compilations() as compiled:
        system = prompts[2]
        first = eng.submit(system + [5], max_new_tokens=NEW, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                           stop_ids=[1, 2])
        eng.step()
        shared = eng.submit(system + [9, 8], max_new_tokens=3, seed=2**40)
        eng.submit(prompts[5], max_new_tokens=1, top_k=10**6, seed=-1)
        cancelled = eng.submit(prompts[1], max_new_tokens=NEW, temperature=1.0)
        eng.step()
        eng.step()
        eng.cancel(cancelled)
        eng.run()
        second = eng.submit(first.prompt_ids + first.token_ids + [7], max_new_tokens=2)
        eng.run()
    assert shared.cached_prefix > 0 and second.cached_prefix > len(system)  # copied from a busy slot; reused
    assert compiled == []


def test_an_image_beside_text_compiles_nothing_more():
    """After an image, another image (of the same bucket) in a prompt of another length,
    beside a text request, compiles nothing."""
    from kimi_jax.config.model import KimiConfig
    from kimi_jax.testing.models import random_model
    from kimi_jax.testing.synthetic import TINY_VISION

    model = random_model(KimiConfig.from_dict(k25_config(TINY_TEXT, TINY_VISION)), dtype=jnp.float32,
                         expert_format="dense")
    patch, placeholder = model.vision_config.patch_size, model.config.media_placeholder_token_id
    rng = np.random.default_rng(0)
    grid = np.array([[1, 4, 4]])  # 16 patches, merged 2 x 2: 4 placeholders

    def submit(before, after):
        prompt = rng.integers(3, 100, before).tolist() + [placeholder] * 4 + rng.integers(3, 100, after).tolist()
        pixels = rng.normal(size=(16, 3, patch, patch)).astype(np.float32)
        return eng.submit(prompt, max_new_tokens=3, pixel_values=pixels, grid_thws=grid)

    eng = engine(model)
    submit(3, 2)
    eng.run()
    with compilations() as compiled:
        later = [submit(6, 7), eng.submit(rng.integers(3, 100, 9).tolist(), max_new_tokens=3, temperature=0.5)]
        eng.run()
    assert [len(r.token_ids) for r in later] == [3, 3] and compiled == []


def test_stop_ids_and_streaming(model, prompts, solo):
    eng = engine(model)
    stop = solo[2][3]
    request = eng.submit(prompts[2], max_new_tokens=NEW, stop_ids=[stop])
    streamed = list(request.stream())
    end = solo[2].index(stop) + 1
    assert streamed == request.token_ids == solo[2][:end]
    assert request.finish_reason == "stop"


def test_sampling_is_seeded_per_request(model, prompts):
    """A request's samples depend on its seed, not on what else runs or where it lands."""
    settings = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=20)
    alone = engine(model, max_slots=1)
    a = alone.submit(prompts[0], seed=7, **settings)
    alone.run()
    crowded = engine(model)
    others = [crowded.submit(p, seed=i, **settings) for i, p in enumerate(prompts[1:4])]
    crowded.step()
    b = crowded.submit(prompts[0], seed=7, **settings)
    crowded.run()
    assert a.token_ids == b.token_ids
    assert any(o.token_ids != a.token_ids for o in others)
    c = alone.submit(prompts[0], seed=8, **settings)
    alone.run()
    assert c.token_ids != a.token_ids
    # temperature alone: unfiltered steps when alone, filtered ones beside a top-p request
    plain = dict(max_new_tokens=NEW, temperature=1.0, seed=5)
    d = alone.submit(prompts[2], **plain)
    alone.run()
    beside = crowded.submit(prompts[1], seed=1, **settings)
    e = crowded.submit(prompts[2], **plain)
    crowded.run()
    assert d.token_ids == e.token_ids and beside.done


def test_second_turn_prefills_only_the_new_tokens(model, prompts, solo):
    eng = engine(model)
    first = eng.submit(prompts[2], max_new_tokens=NEW)
    eng.run()
    before = eng.stats()["prefilled_tokens"]
    follow_up = [5, 9, 2]
    turn = prompts[2] + first.token_ids + follow_up
    second = eng.submit(turn, max_new_tokens=NEW)
    eng.run()
    fed = len(prompts[2]) + NEW - 1  # the last sampled token was never fed
    assert second.cached_prefix == fed
    assert eng.stats()["prefilled_tokens"] - before == len(turn) - fed == len(follow_up) + 1
    fresh = engine(model)
    again = fresh.submit(turn, max_new_tokens=NEW)
    fresh.run()
    assert second.token_ids == again.token_ids


def test_prefix_shared_from_a_busy_slot(model, prompts):
    """A request sharing a system prompt with a running one copies its cache instead of prefilling it."""
    system = prompts[2] + prompts[4]
    eng = engine(model)
    long_running = eng.submit(system + [1], max_new_tokens=30)
    while not long_running.token_ids:
        eng.step()
    before = eng.stats()["prefilled_tokens"]
    other = eng.submit(system + [2, 3], max_new_tokens=NEW)
    eng.run()
    assert other.cached_prefix == len(system)
    assert eng.stats()["prefilled_tokens"] - before == 2
    fresh = engine(model)
    again = fresh.submit(system + [2, 3], max_new_tokens=NEW)
    fresh.run()
    assert other.token_ids == again.token_ids


def test_full_slot_ends_with_length(model, prompts):
    eng = engine(model, max_length=16)
    request = eng.submit(prompts[2], max_new_tokens=50)  # 12 prompt tokens, 16 slots
    eng.run()
    assert request.finish_reason == "length" and len(request.token_ids) == 16 - 12 + 1


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop_ids=range(20)), "stop ids"),
])
def test_bad_requests(model, prompts, bad, match):
    with pytest.raises(ValueError, match=match):
        engine(model).submit(prompts[0], **bad)
    with pytest.raises(ValueError, match="max_length"):
        engine(model, max_length=8).submit(prompts[2])


@pytest.mark.mesh
@pytest.mark.parametrize("mesh", ["data=2,expert=2,tensor=2", "data=1,expert=8,tensor=1"])
def test_sharded_engine_equals_single_device(model, prompts, solo, mesh):
    sharded = kimi_jax.parallel.shard_model(model, mesh)
    eng = Engine(sharded, max_slots=4, max_length=64, prefill_chunk=4, cache_dtype=jnp.float32)
    requests = [eng.submit(p, max_new_tokens=NEW) for p in prompts[:4]]
    eng.run()
    assert [r.token_ids for r in requests] == solo[:4]


def test_generate_on_a_kept_engine_reuses_the_previous_turn(model, prompts, solo):
    eng = engine(model, max_slots=1)
    [first] = kimi_jax.generate(model, [prompts[2]], max_new_tokens=NEW, temperature=0.0, engine=eng)
    assert first.token_ids == solo[2]
    before = eng.stats()["prefilled_tokens"]
    turn = prompts[2] + first.token_ids + [7, 8]
    [second] = kimi_jax.generate(model, [turn], max_new_tokens=NEW, temperature=0.0, engine=eng)
    assert eng.stats()["prefilled_tokens"] - before == 3  # the unfed last token and the two new ones
    assert second.token_ids == kimi_jax.generate(model, [turn], max_new_tokens=NEW, temperature=0.0)[0].token_ids


def test_cancel_and_reset_free_slots(model, prompts, solo):
    eng = engine(model, max_slots=2)
    waiting = [eng.submit(p, max_new_tokens=NEW) for p in prompts[:3]]
    eng.step()
    eng.step()
    eng.cancel(waiting[0])
    eng.cancel(waiting[2])  # never admitted
    eng.run()
    assert [r.finish_reason for r in waiting] == ["cancelled", "length", "cancelled"]
    assert waiting[1].token_ids == solo[1] and eng.stats()["free_slots"] == 2
    eng.reset()
    again = eng.submit(prompts[0], max_new_tokens=NEW)
    eng.run()
    assert again.token_ids == solo[0] and again.cached_prefix == 0


def test_a_failing_callback_leaves_the_engine_usable(model, prompts, solo):
    eng = engine(model, max_slots=1)

    def fail(token):
        raise RuntimeError("the terminal went away")

    request = eng.submit(prompts[1], max_new_tokens=1, on_token=fail)
    with pytest.raises(RuntimeError, match="terminal"):
        eng.run()
    assert request.done and eng.stats()["free_slots"] == 1
    follow = eng.submit(prompts[0], max_new_tokens=NEW)
    eng.run()
    assert follow.token_ids == solo[0]


def test_placeholders_without_media_are_refused(tmp_path):
    from kimi_jax.testing.synthetic import TINY_VISION

    src = write_checkpoint(tmp_path / "hf", k25_config(TINY_TEXT, TINY_VISION), seed=1, dtype="float32")
    model = kimi_jax.load(kimi_jax.convert(src, tmp_path / "ck", dtype="float32", progress=False))
    with pytest.raises(ValueError, match="media placeholders .* but no media"):
        engine(model).submit([1, model.config.media_placeholder_token_id, 2])
    with pytest.raises(ValueError, match="another model"):
        kimi_jax.generate(model, [[1, 2]], engine=engine(kimi_jax.load(tmp_path / "ck")))


def test_top_p_off_is_exact_beside_filtering_rows():
    """A row with top-p 1 keeps every token even when another row of the batch filters."""

    from kimi_jax.inference.sampling import filter_logits

    logits = jax.random.normal(jax.random.key(0), (2, 163840)) * 3
    out = filter_logits(logits, jnp.array([1.0, 0.5]), jnp.array([0, 0]))
    assert bool(jnp.isfinite(out[0]).all()) and not bool(jnp.isfinite(out[1]).all())


def test_several_prompts_prefill_in_one_step(model, prompts, solo):
    """Up to prefill_rows requests read their prompts together; outputs stay their solo ones."""
    eng = engine(model, prefill_chunk=16, prefill_rows=3)
    requests = [eng.submit(p, max_new_tokens=NEW) for p in prompts[:3]]
    eng.step()  # admits all three and prefills their (short) prompts at once
    eng.step()  # reads the first tokens
    assert all(len(r.token_ids) >= 1 for r in requests)
    assert eng.stats()["prefilled_tokens"] == sum(map(len, prompts[:3]))
    eng.run()
    assert [r.token_ids for r in requests] == solo[:3]
