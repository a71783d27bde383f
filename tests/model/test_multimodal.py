"""The whole K2.5 model with media: against Moonshot's reference (golden k25_tiny) and
transformers' Kimi_K25ForConditionalGeneration, generation with images and video chunks,
chat parts, the CLI, sharded loading, and the errors for bad media."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image
from safetensors.numpy import load_file, save_file

import kimi_jax
from kimi_jax.chat.template import ChatTemplate
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.cli.main import main
from kimi_jax.inference.steps import BatchEngine
from kimi_jax.media.placeholders import expand_media_placeholders
from kimi_jax.media.preprocess import preprocess_media
from kimi_jax.testing.demo import DEMO_VOCAB_SIZE, write_tokenizer
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "k25_tiny"
EXACT = dict(temperature=0.0, cache_dtype=jnp.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ golden k25_tiny


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    converted = kimi_jax.convert(GOLDEN, tmp_path_factory.mktemp("k25_tiny") / "c", dtype="float32", progress=False)
    model = kimi_jax.load(converted)
    return model, converted, dict(np.load(GOLDEN / "inputs.npz")), dict(np.load(GOLDEN / "expected.npz"))


def mm1(golden):
    model, _, inputs, _ = golden
    ids = expand_media_placeholders(inputs["mm1_input_ids"][0], inputs["grid_thws"],
                                    placeholder_id=model.config.media_placeholder_token_id)
    return ids[None], dict(pixel_values=inputs["pixel_values"], grid_thws=inputs["grid_thws"])


def test_golden_mm1_logits_and_embeddings(golden):
    """One prompt, 4 media (3 images, one with the position table upsampled, and a 4-frame video chunk)."""
    model, _, _, expected = golden
    ids, media = mm1(golden)
    assert ids.shape == expected["mm1_logits"].shape[:2] == (1, 99)
    err = rel(model(ids, **media), expected["mm1_logits"])
    print(f"mm1 logits vs Moonshot's reference: max |diff| / max |logit| = {err:.1e}")
    assert err < 1e-5
    assert rel(model.embed_inputs(ids, **media), expected["mm1_inputs_embeds"]) < 1e-6


def test_golden_mm2_batch(golden):
    """Two prompts with different media: the reference left-pads the shorter row; we right-pad
    and compare the real positions."""
    model, _, inputs, expected = golden
    media = dict(pixel_values=inputs["mm2_pixel_values"], grid_thws=inputs["mm2_grid_thws"])
    rows = expand_media_placeholders(inputs["mm2_input_ids"], media["grid_thws"],
                                     placeholder_id=model.config.media_placeholder_token_id)
    lengths = [len(r) for r in rows]
    assert lengths == expected["mm2_attention_mask"].sum(1).tolist() == [23, 33]
    ids, mask = np.zeros((2, 33), np.int32), np.zeros((2, 33), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    logits = np.asarray(model(ids, attention_mask=mask, **media))
    embeds = np.asarray(model.embed_inputs(ids, **media))
    real = expected["mm2_attention_mask"].astype(bool)
    for b, n in enumerate(lengths):
        assert rel(logits[b, :n], expected["mm2_logits"][b][real[b]]) < 1e-5
        assert rel(embeds[b, :n], expected["mm2_inputs_embeds"][b][real[b]]) < 1e-6


def test_golden_greedy_continuation_with_images(golden):
    """Moonshot's greedy ids and per-step logits through our engine: the media prefill writes
    the spliced embeddings into the cache, decode continues from it."""
    model, _, inputs, expected = golden
    ids, media = mm1(golden)
    want = expected["mm1_generate_ids"]
    processor_style, expanded = inputs["mm1_input_ids"][0], ids[0]
    for prompt in (processor_style, expanded):  # one placeholder per medium, or already one per token
        [result] = kimi_jax.generate(model, [prompt], max_new_tokens=want.shape[1], **media, **EXACT)
        assert result.token_ids == want[0].tolist() and result.prompt_ids == expanded.tolist()
    engine = BatchEngine(model)
    logits, cache = engine.prefill([expanded], engine.new_cache(1, 128, jnp.float32), chunk=32, **media)
    steps = [logits]
    for token in want[:, :-1].T:
        logits, cache = engine.decode(token, cache)
        steps.append(logits)
    err = rel(np.stack(steps, axis=1), expected["mm1_generate_step_logits"])
    print(f"mm1 generate step logits (chunked media prefill + decode): {err:.1e}")
    assert err < 1e-5


def test_batched_generation_splices_each_rows_media(golden):
    """A batch with different media counts per row generates what each prompt does alone."""
    model, _, inputs, expected = golden
    placeholder = model.config.media_placeholder_token_id
    prompts = [inputs["mm2_input_ids"][1], inputs["mm1_input_ids"][0], [5, 6, 7]]
    grids = [inputs["mm2_grid_thws"][1:], inputs["grid_thws"], np.zeros((0, 3), np.int32)]
    pixels = [inputs["mm2_pixel_values"][24:], inputs["pixel_values"], np.zeros((0, 3, 14, 14), np.float32)]
    batch = kimi_jax.generate(model, prompts, max_new_tokens=4, pixel_values=np.concatenate(pixels),
                              grid_thws=np.concatenate(grids), **EXACT)
    [alone] = kimi_jax.generate(model, [prompts[0]], max_new_tokens=4, pixel_values=pixels[0], grid_thws=grids[0],
                                **EXACT)
    assert batch[0].token_ids == alone.token_ids
    assert batch[1].token_ids == expected["mm1_generate_ids"][0, :4].tolist()
    assert batch[2].token_ids == kimi_jax.generate(model, [prompts[2]], max_new_tokens=4, **EXACT)[0].token_ids
    assert placeholder not in batch[2].prompt_ids


@pytest.mark.mesh
def test_sharded_load_restores_vision_into_shardings(golden):
    _, converted, _, expected = golden
    model = kimi_jax.load(converted, mesh="data=1,expert=8,tensor=1")
    for module in (model.vision_tower, model.mm_projector):
        for array in jax.tree.leaves(nnx.state(module).to_pure_dict()):
            assert isinstance(array.sharding, NamedSharding) and array.sharding.is_fully_replicated
    ids, media = mm1(golden)
    assert rel(model(ids, **media), expected["mm1_logits"]) < 1e-5


# ------------------------------------------------- a tiny random model, its transformers twin

TEXT = dict(vocab_size=DEMO_VOCAB_SIZE, hidden_size=48, intermediate_size=80, moe_intermediate_size=16,
            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24,
            qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
            max_position_embeddings=4096)
# Square position table (transformers assumes one) that grids both smaller and larger than it resize.
VISION = dict(vt_hidden_size=40, vt_intermediate_size=56, vt_num_attention_heads=2, vt_num_hidden_layers=2,
              mm_hidden_size=40, init_pos_emb_height=6, init_pos_emb_width=6, init_pos_emb_time=4)


def picture(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random K2.5 checkpoint with a tokenizer, converted and loaded (float32), and pictures on disk."""
    work = tmp_path_factory.mktemp("multimodal")
    src = write_checkpoint(work / "hf", k25_config(TEXT, VISION), seed=11, dtype="float32")
    write_tokenizer(src, DEMO_VOCAB_SIZE)
    converted = kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)
    pictures = []
    for i, (w, h) in enumerate([(56, 56), (140, 84)]):
        pictures.append(work / f"picture{i}.png")
        Image.fromarray(picture(w, h, i)).save(pictures[-1])
    return kimi_jax.load(converted), converted, src, pictures


@pytest.mark.reference
def test_logits_match_transformers(tiny):
    """Several images of different sizes (grids below and above the 6 x 6 position table, one
    padded to multiples of 28) and a 2-frame video chunk in one prompt."""
    torch = pytest.importorskip("torch")
    from hf_reference import hf_kimi_k25

    model, _, src, _ = tiny
    placeholder = model.config.media_placeholder_token_id
    media = [picture(56, 56, 1), picture(140, 84, 2), picture(60, 115, 3), np.stack([picture(56, 84, 4)] * 2)]
    pixel_values, grid_thws = preprocess_media(media)
    assert grid_thws.tolist() == [[1, 4, 4], [1, 6, 10], [1, 10, 6], [2, 6, 4]]
    rng = np.random.default_rng(0)
    text = rng.integers(0, 384, 25).tolist()  # ordinary tokens (the special ids come after them)
    ids = text[:5]
    for i in range(len(media)):
        ids += [placeholder] + text[5 + 5 * i : 10 + 5 * i]
    ids = expand_media_placeholders(ids, grid_thws, placeholder_id=placeholder)
    hf = hf_kimi_k25(src)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids[None].astype(np.int64)), pixel_values=torch.from_numpy(pixel_values),
                  image_grid_thw=torch.from_numpy(grid_thws)).logits.numpy()
    got = model(ids[None], pixel_values=pixel_values, grid_thws=grid_thws)
    err = rel(got, want)
    print(f"multimodal logits vs transformers: max |diff| / max |logit| = {err:.1e}")
    assert err < 1e-5


def data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_conversation_with_image_parts_and_a_video(tiny):
    """Image parts as a path, a data: URL, a PIL image and an array, and a video given as its
    frames: the prompt is the template's text with the video's chunk prompts, one placeholder
    per medium expanded, and the result equals the token-id route."""
    model, converted, _, pictures = tiny
    array = np.asarray(Image.open(pictures[1]))
    frames = np.stack([picture(56, 84, 10 + i) for i in range(6)])  # 6 frames at 2 fps: chunks of 4 and 2
    chat = [{"role": "user", "content": [
        {"type": "image", "image": str(pictures[0])},
        {"type": "image_url", "image_url": {"url": data_url(array)}},
        {"type": "text", "text": "Same as "},
        {"type": "image", "image": Image.fromarray(array)},
        {"type": "image", "image": array},
        {"type": "video", "video": frames, "fps": 2.0},
        {"type": "text", "text": "What changes?"},
    ]}]
    [result] = kimi_jax.generate(model, [chat], tokenizer=converted, mode="instant", max_new_tokens=3, **EXACT)
    tokenizer = Tokenizer.from_dir(converted)
    text = ChatTemplate.from_dir(converted).render(chat, thinking=False)
    chunk = "<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"
    text = text.replace("<|kimi_k25_video_placeholder|>", f"00:00:00.000{chunk}00:00:02.000{chunk}")
    pixel_values, grid_thws = preprocess_media([pictures[0], array, array, array, list(frames[:4]), list(frames[4:])])
    assert grid_thws[:, 0].tolist() == [1, 1, 1, 1, 4, 2]
    ids = expand_media_placeholders(tokenizer.encode(text), grid_thws, placeholder_id=tokenizer.media_pad_id)
    assert result.prompt_ids == ids.tolist()
    [same] = kimi_jax.generate(model, [tokenizer.encode(text)], pixel_values=pixel_values, grid_thws=grid_thws,
                               max_new_tokens=3, **EXACT)
    assert result.token_ids == same.token_ids


def test_cli_generate_and_chat_with_images(tiny, capsys, monkeypatch):
    model, converted, _, pictures = tiny
    fast = ["--dtype", "float32", "--max-new-tokens", "3", "--mode", "instant"]
    args = ["generate", str(converted), "--prompt", "What is in these?", "--image", str(pictures[0]),
            "--image", str(pictures[1])]
    assert main(args + fast) == 0
    out, err = capsys.readouterr()
    tokenizer = Tokenizer.from_dir(converted)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
    text = ChatTemplate.from_dir(converted).render(chat, thinking=False).replace(
        "x<|im_end|>", "What is in these?<|im_end|>")
    expected = len(tokenizer.encode(text)) - 2 + 4 + 15  # the 56 x 56 picture is 4 tokens, 140 x 84 is 15
    assert out.startswith("[answer]") and f"[{expected} prompt tokens" in err

    assert main(["generate", str(converted), "--prompt", "Hi", "--image", "missing.png", *fast]) == 2
    assert "cannot read image 'missing.png': file does not exist" in capsys.readouterr().err

    calls = []

    def spy(model, prompts, **kwargs):
        calls.append(prompts[0])
        return generate(model, prompts, **kwargs)

    generate = kimi_jax.generate
    monkeypatch.setattr(kimi_jax, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image nowhere.png\n/image {pictures[0]}\nWhat is it?\nAnd?\n"))
    assert main(["chat", str(converted), *fast]) == 0
    out = capsys.readouterr().out
    assert "error: cannot read image 'nowhere.png'" in out and f"attached {pictures[0]}" in out
    first, second = calls[0][0], calls[1][2]
    assert first["content"] == [{"type": "image", "image": str(pictures[0])}, {"type": "text", "text": "What is it?"}]
    assert second == {"role": "user", "content": "And?"}


# ------------------------------------------------------------------------------ errors


def test_placeholder_and_media_mismatches(golden):
    model, _, inputs, _ = golden
    media = dict(pixel_values=inputs["pixel_values"], grid_thws=inputs["grid_thws"])
    processor_style = inputs["mm1_input_ids"]
    with pytest.raises(ValueError, match=r"hold 4 media placeholders, but the 4 media .* take 58 tokens.*expand_media"):
        model(processor_style, **media)
    with pytest.raises(ValueError, match="together"):
        model(processor_style, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"a run of 3 media placeholders at position 10 for medium 0, which takes 6"):
        expand_media_placeholders([1] * 10 + [250] * 3, [[1, 4, 6]], placeholder_id=250)
    with pytest.raises(ValueError, match="hold 4 runs of media placeholders.*grid_thws has 3 media"):
        expand_media_placeholders(processor_style[0], inputs["grid_thws"][:3], placeholder_id=250)
    with pytest.raises(ValueError, match=r"prompt 1 holds 1 image or video placeholder.*give 0 media"):
        kimi_jax.generate(model, [processor_style[0], [1, 250, 2]], max_new_tokens=1, **media)
    with pytest.raises(ValueError, match="grid_thws has 4 media, but .* hold only 1"):
        kimi_jax.generate(model, [[1, 250, 2]], max_new_tokens=1, **media)
    config = kimi_jax.KimiConfig.from_dict(k25_config(TEXT, multimodal=False))
    text_only = nnx.eval_shape(lambda: kimi_jax.Kimi(config, dtype=jnp.float32))
    with pytest.raises(ValueError, match="no vision tower"):
        text_only(np.ones((1, 6), np.int32), **media)


def test_unreadable_and_unsupported_media(tiny, tmp_path):
    model, converted, _, pictures = tiny

    def ask(*parts):
        chat = [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]
        return kimi_jax.generate(model, [chat], tokenizer=converted, max_new_tokens=1, **EXACT)

    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        ({"type": "image", "image": str(tmp_path / "missing.png")},
         r"prompt 0: media item 0: cannot read image .*missing\.png': file does not exist"),
        ({"type": "image", "image": str(tmp_path / "notes.txt")}, "notes.txt'.*not an image format"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "remote image"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}, "bad base64"),
        ({"type": "image", "image": np.zeros((4, 4, 3), np.float32)}, "dtype float32"),
        ({"type": "image"}, r"message 0, part 0 \(image\): no image given"),
        ({"type": "video_url", "video_url": {"url": "clip.mp4"}}, "encoded videos"),
        ({"type": "video", "video": [picture(28, 28, 0)] * 2}, "'fps'"),
    ]
    for part, match in cases:
        with pytest.raises(ValueError, match=match):
            ask(part)


def test_converter_checks_vision_tensors(tiny, tmp_path):
    _, _, src, _ = tiny

    def convert_edited(edit):
        folder = shutil.copytree(src, tmp_path / f"hf{len(list(tmp_path.iterdir()))}")
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return kimi_jax.convert(folder, tmp_path / "out", progress=False)

    with pytest.raises(kimi_jax.ConversionError, match=r"unexpected tensor vision_tower\.encoder\.blocks\.0\.extra"):
        convert_edited(lambda t: t.setdefault("vision_tower.encoder.blocks.0.extra.weight", np.zeros(2, np.float32)))
    with pytest.raises(kimi_jax.ConversionError, match=r"missing tensor mm_projector\.proj\.2\.bias"):
        convert_edited(lambda t: t.pop("mm_projector.proj.2.bias"))
    conv = "vision_tower.patch_embed.proj.weight"
    with pytest.raises(kimi_jax.ConversionError, match=rf"{conv} has shape \[40, 3, 7, 7\], expected \[40, 3, 14, 14\]"):
        convert_edited(lambda t: t.update({conv: np.zeros((40, 3, 7, 7), np.float32)}))


def test_old_checkpoint_format_is_refused(tiny, tmp_path):
    _, converted, _, _ = tiny
    old = shutil.copytree(converted, tmp_path / "old")
    info = json.loads((old / "kimi_jax.json").read_text())
    (old / "kimi_jax.json").write_text(json.dumps({**info, "format_version": 1}))
    with pytest.raises(ValueError, match="converted to checkpoint format 1.*convert the Hugging Face checkpoint again"):
        kimi_jax.load(old)
