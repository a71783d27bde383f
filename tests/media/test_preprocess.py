"""Media preprocessing against Moonshot's reference processor (golden k25_preproc) and
transformers' Kimi K2.5 processors."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimi_jax.media.preprocess import (
    PreprocessConfig,
    VideoChunk,
    load_image,
    num_media_tokens,
    preprocess_image,
    preprocess_media,
    preprocess_video_chunk,
    resize_plan,
    resize_size,
    sample_video_frames,
    split_video_chunks,
    timestamp_as_str,
    video_chunk_resize_plan,
)

FIX = Path(__file__).parents[1] / "fixtures" / "k25_preproc"
REPO_CONFIG = Path(__file__).parents[2] / "kimi_jax" / "config" / "presets" / "kimi-k2.5" / "preprocessor_config.json"
IMAGES = ["img_84x56", "img_100x110", "img_140x160"]
VIDEO = "video_chunk_4x56x84"
VIDEO_FRAMES = [FIX / f"{VIDEO}_frame{i}.png" for i in range(4)]


@pytest.fixture(scope="module")
def cases():
    return json.loads((FIX / "cases.json").read_text())


@pytest.fixture(scope="module")
def expected():
    with np.load(FIX / "expected.npz") as z:
        return {k: z[k] for k in z.files}


CFG = PreprocessConfig()


# ------------------------------------------------------------------ config


def test_config_defaults_equal_real_file(cases):
    assert PreprocessConfig.from_file(REPO_CONFIG) == CFG
    assert PreprocessConfig.default() == CFG
    assert PreprocessConfig.from_dict(cases) == CFG  # the config the golden run used
    assert PreprocessConfig.from_dict(cases["media_proc_cfg"]) == CFG
    assert CFG.pad_multiple == 28 and CFG.frame_patch_limit == 4096
    d = json.loads(REPO_CONFIG.read_text())["media_proc_cfg"]
    assert {k: v for k, v in CFG.to_dict().items()} == {k: v for k, v in d.items() if k != "config_type"}


def test_config_overrides_and_errors(tmp_path):
    c = PreprocessConfig.from_dict({"media_proc_cfg": {"in_patch_limit": 1024, "merge_kernel_size": [2, 2]}})
    assert c.in_patch_limit == 1024 and c.merge_kernel_size == 2 and c.patch_size == 14
    assert PreprocessConfig.from_file(REPO_CONFIG.parent) == CFG  # a directory works too
    with pytest.raises(ValueError, match="patch_size"):
        PreprocessConfig.from_dict({"patch_size": 0})
    with pytest.raises(ValueError, match="timestamp_mode"):
        PreprocessConfig(timestamp_mode="seconds")
    with pytest.raises(ValueError, match="does not exist"):
        PreprocessConfig.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        PreprocessConfig.from_file(bad)


# ------------------------------------------------------------------ resize arithmetic


def test_resize_matches_every_reference_image_case(cases):
    rows = cases["navit_resize_image"]
    assert len(rows) >= 20
    for r in rows:
        plan = resize_plan(r["width"], r["height"], CFG).as_dict()
        assert plan == {k: r[k] for k in plan}, r
        assert resize_size(r["width"], r["height"], CFG) == (r["new_width"], r["new_height"])
    r = cases["img_7200x30_resize_config"]
    assert resize_plan(7200, 30, CFG).as_dict() == r


def test_resize_matches_every_reference_video_chunk_case(cases):
    for r in cases["navit_resize_video_chunk"]:
        plan = video_chunk_resize_plan(r["width"], r["height"], r["nframes"], CFG).as_dict()
        assert plan == {k: r[k] for k in plan}, r
        assert resize_size(r["width"], r["height"], CFG, video=True) == (r["new_width"], r["new_height"])


def test_resize_invariants():
    rng = np.random.default_rng(1)
    for w, h in rng.integers(1, 20000, size=(3000, 2)).tolist():
        p = resize_plan(w, h, CFG)
        assert 1 <= p.new_width <= w and 1 <= p.new_height <= h  # never upscale
        assert p.new_width <= 512 * 14 and p.new_height <= 512 * 14
        assert p.padded_width % 28 == 0 and p.padded_height % 28 == 0
        assert 0 <= p.pad_width < 28 and 0 <= p.pad_height < 28
        assert p.num_tokens == (p.padded_width // 28) * (p.padded_height // 28)


def _transformers_kimi(module):
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("transformers' Kimi K2.5 processors need torchvision, which is not installed")
    try:
        return pytest.importorskip(f"transformers.models.kimi_k25.{module}")
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"transformers has no usable kimi_k25 {module}: {e}")


@pytest.mark.reference
def test_resize_matches_transformers_navit_resize():
    mod = _transformers_kimi("image_processing_kimi_k25")
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 20000, size=(2000, 2)).tolist() + [[7200, 30], [1, 1], [8000, 8000]]
    for w, h in sizes:
        (nh, nw), (ph, pw) = mod.navit_resize(h, w, 14, 2, 16384, 512)
        p = resize_plan(w, h, CFG)
        assert (p.new_width, p.new_height, p.padded_width, p.padded_height) == (nw, nh, pw, ph)


# ------------------------------------------------------------------ pixels vs golden


@pytest.mark.parametrize("name", IMAGES)
def test_golden_images_exact(name, expected):
    pv, grid = preprocess_image(FIX / f"{name}.png", CFG)
    want = expected[f"{name}_pixel_values"]
    assert pv.dtype == np.float32 and pv.shape == want.shape
    np.testing.assert_array_equal(pv, want)  # bit-exact
    assert grid.tolist() == expected[f"{name}_grid_thw"][0].tolist()
    # the same pixels through a PIL image and a uint8 array
    arr = np.asarray(Image.open(FIX / f"{name}.png").convert("RGB"))
    np.testing.assert_array_equal(preprocess_image(arr, CFG)[0], want)
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(arr), CFG)[0], want)


def test_golden_resized_image_exact(cases, expected):
    """7200x30 hits the 512-patches-per-side limit: Pillow bicubic to 7168x29, pad to 56 rows."""
    pv, grid = preprocess_image(str(FIX / "img_7200x30.png"), CFG)
    assert grid.tolist() == [1, 4, 512] == expected["img_7200x30_grid_thw"][0].tolist()
    assert list(pv.shape) == cases["img_7200x30_pixel_values_shape"]
    np.testing.assert_array_equal(pv[:8], expected["img_7200x30_pixel_values_first_patches"])
    digest = hashlib.sha256(np.ascontiguousarray(pv, dtype=np.float32).tobytes()).hexdigest()
    assert digest == cases["img_7200x30_pixel_values_sha256_f32"]
    # pixel rows 29..55 are zero padding -> -1 after normalisation (row 28 is the last real one)
    rows = pv.reshape(4, 512, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(56, 7168, 3)
    assert np.all(rows[29:] == -1.0) and not np.all(rows[28] == -1.0)


def test_golden_video_chunk_exact(expected):
    want = expected[f"{VIDEO}_pixel_values"]
    pv, grid = preprocess_video_chunk(VIDEO_FRAMES, CFG)
    np.testing.assert_array_equal(pv, want)
    assert grid.tolist() == [4, 6, 4] == expected[f"{VIDEO}_grid_thw"][0].tolist()
    stacked = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in VIDEO_FRAMES])
    np.testing.assert_array_equal(preprocess_video_chunk(stacked, CFG)[0], want)
    # frame-major order: frame t's patches are the single-frame patches of that frame
    p0, g0 = preprocess_video_chunk(VIDEO_FRAMES[2:3], CFG)
    assert g0.tolist() == [1, 6, 4]
    np.testing.assert_array_equal(pv[48:72], p0)


def test_pack_matches_k25_tiny_inputs(expected):
    """k25_tiny's pixel_values (304 patches) are these four media packed in order."""
    items = [FIX / f"{n}.png" for n in IMAGES] + [{"type": "video_chunk", "video_chunk": VIDEO_FRAMES}]
    pv, grids = preprocess_media(items, CFG)
    want = np.concatenate([expected[f"{n}_pixel_values"] for n in IMAGES + [VIDEO]])
    assert pv.shape == (304, 3, 14, 14)
    np.testing.assert_array_equal(pv, want)
    assert grids.dtype == np.int64
    assert grids.tolist() == [[1, 4, 6], [1, 8, 8], [1, 12, 10], [4, 6, 4]]
    assert num_media_tokens(grids).tolist() == [6, 16, 30, 6]  # golden media_token_counts
    assert [num_media_tokens(g) for g in grids] == [6, 16, 30, 6]
    assert int(num_media_tokens(grids).sum()) == 58
    # the other item forms give the same packing
    pv2, grids2 = preprocess_media(
        [{"type": "image", "image": str(FIX / f"{IMAGES[0]}.png")}, Image.open(FIX / f"{IMAGES[1]}.png"),
         np.asarray(Image.open(FIX / f"{IMAGES[2]}.png")), tuple(VIDEO_FRAMES)], CFG)
    np.testing.assert_array_equal(pv2, want)
    assert grids2.tolist() == grids.tolist()
    pv3, grids3 = preprocess_media([], CFG)
    assert pv3.shape == (0, 3, 14, 14) and grids3.shape == (0, 3)


def test_rgb_conversion_like_reference():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (30, 45, 4), dtype=np.uint8)
    # the reference uses PIL convert("RGB"): alpha is dropped, not composited
    a = preprocess_image(Image.fromarray(rgba, "RGBA"), CFG)[0]
    b = preprocess_image(np.ascontiguousarray(rgba[..., :3]), CFG)[0]
    np.testing.assert_array_equal(a, b)
    gray = rng.integers(0, 256, (30, 45), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_image(gray, CFG)[0],
                                  preprocess_image(np.repeat(gray[..., None], 3, -1), CFG)[0])
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    np.testing.assert_array_equal(preprocess_image(buf.getvalue(), CFG)[0], preprocess_image(gray, CFG)[0])
    assert load_image(gray).mode == "RGB"


# ------------------------------------------------------------------ video sampling


def test_sample_video_frames_and_chunks():
    # 95 frames at 30 fps -> round(95 * 2 / 30) = 6 frames, linspace(0, 94, 6).round()
    assert sample_video_frames(95, 30.0, CFG) == [0, 19, 38, 56, 75, 94]
    frames = [np.full((20, 30, 3), i, np.uint8) for i in range(95)]
    chunks = split_video_chunks(frames, 30.0, CFG)
    assert [c.frame_indices for c in chunks] == [(0, 19, 38, 56), (75, 94)]
    assert [c.timestamp_text for c in chunks] == ["00:00:00.000", "00:00:02.500"]
    assert chunks[1].frames[0][0, 0, 0] == 75
    assert chunks[1].prompt == "00:00:02.500<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"
    # a chunk is one medium; a 2-frame chunk still costs (H/28)(W/28) tokens
    pv, grids = preprocess_media(chunks, CFG)
    assert grids.tolist() == [[4, 2, 4], [2, 2, 4]] and pv.shape == (48, 3, 14, 14)
    assert num_media_tokens(grids).tolist() == [2, 2]
    # slower than sample_fps: every frame is kept
    assert sample_video_frames(5, 1.0, CFG) == [0, 1, 2, 3, 4]
    assert sample_video_frames(1, 25.0, CFG) == [0]
    # explicit per-frame timestamps (seconds): fps inferred, chunk time = first frame's time
    ts = [10.0 + i / 4 for i in range(20)]  # 4 fps
    ch = split_video_chunks(list(range(20)), cfg=CFG, timestamps=ts)
    assert [c.frame_indices for c in ch] == [(0, 2, 4, 6), (8, 11, 13, 15), (17, 19)]
    assert [c.timestamp_text for c in ch] == ["00:00:10.000", "00:00:12.000", "00:00:14.250"]
    assert isinstance(ch[0], VideoChunk) and ch[0].frames == (0, 2, 4, 6)


def test_timestamp_text():
    assert timestamp_as_str(0.0) == "00:00:00.000"
    assert timestamp_as_str(3725.25) == "01:02:05.250"
    assert timestamp_as_str(61.5, "mm:ss.fff") == "01:01.500"
    assert timestamp_as_str(61.5, "mm:ss") == "01:01"
    assert timestamp_as_str(19 / 30) == "00:00:00.633"  # truncated, as the reference does
    with pytest.raises(ValueError):
        timestamp_as_str(-1.0)


def test_num_media_tokens():
    assert num_media_tokens((1, 4, 6)) == 6
    assert num_media_tokens((4, 6, 4)) == 6
    assert num_media_tokens(np.array([[1, 8, 8], [1, 12, 10]])).tolist() == [16, 30]
    with pytest.raises(ValueError):
        num_media_tokens((1, 3, 4))
    with pytest.raises(ValueError):
        num_media_tokens((1, 4))


# ------------------------------------------------------------------ transformers


def _rand_image(rng, w, h):
    # smooth gradients plus noise, so resampling differences are realistic
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], -1)
    noise = rng.integers(-40, 41, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.reference
def test_matches_transformers_image_processor():
    mod = _transformers_kimi("image_processing_kimi_k25")
    proc = mod.Kimi_K25ImageProcessor()
    rng = np.random.default_rng(4)
    # not resized: identical up to float rounding of the fused rescale/normalise
    for w, h in [(37, 53), (101, 67), (333, 17), (29, 57), (1, 1)]:
        img = _rand_image(rng, w, h)
        out = proc(images=[Image.fromarray(img)], return_tensors="np")
        pv, grid = preprocess_image(img, CFG)
        assert out["image_grid_thw"].tolist() == [grid.tolist()]
        np.testing.assert_allclose(pv, out["pixel_values"], rtol=0, atol=1e-6)
    # resized: torchvision's antialiased bicubic vs Pillow's bicubic (the reference): rounding
    # differences of at most two uint8 levels (4/255 after normalisation) on <1% of the values
    for w, h in [(7211, 33), (2101, 2203)]:
        img = _rand_image(rng, w, h)
        out = proc(images=[Image.fromarray(img)], return_tensors="np")
        pv, grid = preprocess_image(img, CFG)
        assert out["image_grid_thw"].tolist() == [grid.tolist()]
        diff = np.abs(pv - out["pixel_values"])
        assert diff.max() <= 4 / 255 + 1e-6
        assert (diff > 1e-6).mean() < 0.01


def test_matches_transformers_video_processor():
    mod = _transformers_kimi("video_processing_kimi_k25")
    proc = mod.Kimi_K25VideoProcessor()
    rng = np.random.default_rng(5)
    frames = np.stack([_rand_image(rng, 57, 43) for _ in range(4)])
    out = proc(videos=[frames], do_sample_frames=False, return_tensors="np")
    pv, grid = preprocess_video_chunk(frames, CFG)
    assert out["video_grid_thw"].tolist() == [grid.tolist()] == [[4, 4, 6]]
    np.testing.assert_allclose(pv, out["pixel_values_videos"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_clear_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"missing\.png.*does not exist"):
        load_image(missing)
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*not an image format"):
        preprocess_image(txt, CFG)
    fake_video = tmp_path / "clip.mp4"
    fake_video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    with pytest.raises(ValueError, match=r"clip\.mp4.*decoded into frames"):
        load_image(fake_video)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes((FIX / "img_84x56.png").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"trunc\.png.*(corrupt|truncated)"):
        load_image(truncated)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="unsupported image input"):
        load_image(12345)
    with pytest.raises(ValueError, match="at most temporal_merge_kernel_size=4"):
        preprocess_video_chunk([np.zeros((28, 28, 3), np.uint8)] * 5, CFG)
    with pytest.raises(ValueError, match="at least one frame"):
        preprocess_video_chunk([], CFG)
    with pytest.raises(ValueError, match="same size"):
        preprocess_video_chunk([np.zeros((28, 28, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)], CFG)
    with pytest.raises(ValueError, match=r"media item 1: unsupported media type 'video'"):
        preprocess_media([np.zeros((28, 28, 3), np.uint8), {"type": "video", "video": "x.mp4"}], CFG)
    with pytest.raises(ValueError, match=r"media item 0: .*does not exist"):
        preprocess_media([missing], CFG)
    with pytest.raises(ValueError, match="positive"):
        resize_plan(0, 10, CFG)
    with pytest.raises(ValueError, match="fps"):
        sample_video_frames(10, 0.0, CFG)
    with pytest.raises(ValueError, match="timestamps"):
        split_video_chunks([1, 2, 3], 30.0, CFG, timestamps=[0.0, 1.0])
    assert math.isfinite(CFG.sample_fps)
