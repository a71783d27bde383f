"""Generation: sampling filters, greedy decoding against transformers and Moonshot's reference,
stop conditions, prompt checks, and prompts given as text or conversations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.chat.parser import parse_output
from kimi_jax.chat.template import ChatTemplate
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.inference.engine import Engine
from kimi_jax.inference.sampling import Sampling, sample, top_k_filter, top_p_filter
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.testing.demo import write_tokenizer
from kimi_jax.testing.synthetic import TINY_TEXT, k25_config, write_checkpoint

PROMPT_LENGTHS = [5, 11, 2]
NEW_TOKENS = 12
EXACT = dict(temperature=0.0, cache_dtype=jnp.float32)  # greedy, cache in the model's float32

# ---------------------------------------------------------------------------------------------
# Sampling filters

PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # deliberately unsorted


@pytest.mark.parametrize("p, kept", [(0.3, {1}), (0.5, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 2, 3, 4}),
                                     (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    out = np.asarray(top_p_filter(jnp.log(jnp.asarray(PROBS))[None], p))[0]
    assert set(np.flatnonzero(np.isfinite(out))) == kept
    np.testing.assert_allclose(out[np.isfinite(out)], np.log(PROBS)[np.isfinite(out)], rtol=1e-6)


def test_top_p_mass_on_random_rows():
    logits = jax.random.normal(jax.random.key(0), (64, 100)) * 3
    probs = np.asarray(jax.nn.softmax(logits))
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = np.isfinite(np.asarray(top_p_filter(logits, p)))
        mass = (probs * kept).sum(-1)
        smallest_kept = np.where(kept, probs, np.inf).min(-1)
        assert (mass >= p - 1e-6).all() and (mass - smallest_kept < p).all()


def test_top_k():
    logits = jnp.log(jnp.asarray(PROBS))[None]
    assert set(np.flatnonzero(np.isfinite(np.asarray(top_k_filter(logits, 2))[0]))) == {1, 3}
    assert np.isfinite(np.asarray(top_k_filter(logits, 10))).all()


def test_sampled_frequencies_follow_the_nucleus():
    n = 20000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS)), (n, 5))
    tokens = np.asarray(sample(logits, jax.random.key(1), Sampling(temperature=1.0, top_p=0.8)))
    freq = np.bincount(tokens, minlength=5) / n
    np.testing.assert_allclose(freq, np.array([0, 0.5, 0, 0.2, 0.15]) / 0.85, atol=0.015)
    tokens = np.asarray(sample(logits, jax.random.key(2), Sampling(temperature=1.0, top_k=2)))
    assert set(tokens.tolist()) == {1, 3}


def test_temperature_zero_and_top_1_are_greedy():
    logits = jax.random.normal(jax.random.key(3), (16, 50))
    greedy = np.asarray(jnp.argmax(logits, -1))
    for seed in range(3):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(sample(logits, key, Sampling(temperature=0.0, top_p=0.5, top_k=3)), greedy)
        np.testing.assert_array_equal(sample(logits, key, Sampling(temperature=1.0, top_k=1)), greedy)
        np.testing.assert_array_equal(sample(logits, key, Sampling(temperature=1e-4)), greedy)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_sampling_settings_are_checked(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)


# ---------------------------------------------------------------------------------------------
# A tiny model, its transformers twin and a byte-level tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate")
    src = write_checkpoint(work / "hf", k25_config(TINY_TEXT, multimodal=False), seed=5, dtype="float32")
    write_tokenizer(src, TINY_TEXT["vocab_size"])
    converted = kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)
    model = kimi_jax.load(converted)
    ids = np.random.default_rng(1).integers(0, 256, (len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)))
    prompts = [row[:n].tolist() for row, n in zip(ids, PROMPT_LENGTHS)]
    return model, converted, src, work, prompts


@pytest.fixture(scope="module")
def greedy(tiny):
    model, _, _, _, prompts = tiny
    return kimi_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, **EXACT)


@pytest.mark.reference
def test_greedy_matches_transformers_generate(tiny, greedy):
    torch = pytest.importorskip("torch")
    from hf_reference import load_hf_text_model

    model, _, src, work, prompts = tiny
    ref = load_hf_text_model(src, work / "hf_text")
    agree = total = 0
    for prompt, ours in zip(prompts, greedy):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=model.config.eos_token_id, pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        agree += sum(a == b for a, b in zip(ours.token_ids, theirs))
        total += len(theirs)
        assert ours.token_ids == theirs
    print(f"greedy vs transformers generate: {agree}/{total} tokens agree")


def test_stop_ids_and_max_new_tokens_per_sequence(tiny, greedy):
    model, _, _, _, prompts = tiny
    stop = greedy[0].token_ids[3]
    results = kimi_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_ids=[stop], **EXACT)
    for full, result in zip(greedy, results):
        if stop in full.token_ids:
            cut = full.token_ids.index(stop) + 1
            assert (result.token_ids, result.finish_reason) == (full.token_ids[:cut], "stop")
        else:
            assert (result.token_ids, result.finish_reason) == (full.token_ids, full.finish_reason)
    assert results[0].finish_reason == "stop" and len(results[0].token_ids) <= 4
    short = kimi_jax.generate(model, prompts, max_new_tokens=3, **EXACT)
    assert [r.token_ids for r in short] == [r.token_ids[:3] for r in greedy]
    for r, full in zip(short, greedy):
        assert r.finish_reason == ("stop" if len(full.token_ids) <= 3 and full.finish_reason == "stop" else "length")


def test_streaming(tiny, greedy):
    model, _, _, _, prompts = tiny
    seen = [[] for _ in prompts]
    kimi_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, on_token=lambda i, t: seen[i].append(t), **EXACT)
    assert seen == [r.token_ids for r in greedy]
    stop = greedy[0].token_ids[1]
    engine = Engine(model, max_slots=2, max_length=64, cache_dtype=jnp.float32)
    request = engine.submit(prompts[0], max_new_tokens=NEW_TOKENS, stop_ids=[stop])
    assert list(request.stream()) == greedy[0].token_ids[:2] and request.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny):
    model, _, _, _, prompts = tiny
    kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, cache_dtype=jnp.float32)
    a, b = (kimi_jax.generate(model, prompts, seed=7, **kwargs) for _ in range(2))
    c = kimi_jax.generate(model, prompts, seed=8, **kwargs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]


def test_text_and_chat_prompts(tiny):
    model, converted, _, _, _ = tiny
    tok = Tokenizer.from_dir(converted)
    chat = [{"role": "user", "content": "Hi!"}]
    results = kimi_jax.generate(model, ["Hello world", chat, [1, 2, 3]], tokenizer=converted, mode="instant",
                                max_new_tokens=4, **EXACT)
    text, conversation, ids = results
    assert text.prompt_ids == tok.encode("Hello world") and ids.prompt_ids == [1, 2, 3]
    template = ChatTemplate.from_dir(converted)
    assert not template.is_builtin
    assert conversation.prompt_ids == tok.encode_chat(chat, template=template, thinking=False)
    for r in results:
        kept = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
        assert r.text == tok.decode(kept)
    assert conversation.parsed.content == conversation.text and text.parsed is None and ids.parsed is None


def test_thinking_chat_is_parsed(tiny):
    model, converted, _, _, _ = tiny
    chats = [[{"role": "user", "content": text}] for text in ("Hi!", "Hello", "2+2?")]
    tok = Tokenizer.from_dir(converted)
    for result in kimi_jax.generate(model, chats, tokenizer=converted, max_new_tokens=4, **EXACT):
        assert result.prompt_ids[-1] == tok.think_id
        assert result.parsed == parse_output(result.text, thinking=True)


def test_prompt_errors(tiny):
    model, converted, _, _, _ = tiny
    context = model.config.text.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1 has {context + 1} tokens.*max_position_embeddings = {context}"):
        kimi_jax.generate(model, [[1], [1] * (context + 1)])
    with pytest.raises(ValueError, match=r"prompt 0 has 40 tokens: longer than the cache \(32 tokens\)"):
        kimi_jax.generate(model, [[1] * 40], cache_length=32)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        kimi_jax.generate(model, [[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kimi_jax.generate(model, [[1, 512]])
    with pytest.raises(ValueError, match="image or video placeholder"):
        kimi_jax.generate(model, [[1, model.config.media_placeholder_token_id]])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        kimi_jax.generate(model, ["text"])
    with pytest.raises(TypeError, match="list of prompts"):
        kimi_jax.generate(model, [1, 2, 3])
    with pytest.raises(ValueError, match="unknown mode"):
        kimi_jax.generate(model, [[1]], mode="agent")


# ---------------------------------------------------------------------------------------------
# Moonshot's reference (golden text_e8, and text_e8_int4 with INT4 experts): greedy ids and
# per-step logits of its generate()


@pytest.fixture(scope="module", params=["text_e8", "text_e8_int4"])
def golden(fixtures, tmp_path_factory, request):
    folder = fixtures / "golden" / request.param
    model = kimi_jax.load(kimi_jax.convert(folder, tmp_path_factory.mktemp("golden") / "c", dtype="float32",
                                           progress=False))
    return model, np.load(folder / "inputs.npz")["input_ids"], dict(np.load(folder / "expected.npz"))


def test_golden_generate_ids(golden):
    model, prompts, expected = golden
    results = kimi_jax.generate(model, prompts, max_new_tokens=expected["generate_ids"].shape[1], **EXACT)
    np.testing.assert_array_equal([r.token_ids for r in results], expected["generate_ids"])


def test_golden_step_logits(golden):
    model, prompts, expected = golden
    engine = BatchEngine(model)
    logits, cache = engine.prefill(prompts, engine.new_cache(len(prompts), 128, jnp.float32))
    steps = [logits]
    for token in expected["generate_ids"][:, :-1].T:
        logits, cache = engine.decode(token, cache)
        steps.append(logits)
    ref = expected["generate_step_logits"]
    err = np.abs(np.stack(steps, axis=1) - ref).max() / np.abs(ref).max()
    print(f"golden generate step logits: max |diff| / max |logit| = {err:.2e}")
    assert err < 1e-5
