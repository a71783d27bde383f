"""Video files (kimi_jax.media.video): videos encoded here with PyAV (solid colours of known
values, several codecs and frame rates, one with a variable frame rate) are sampled, chunked
and timestamped by the reference's rules, their token counts match their placeholders, a tiny
K2.5 answers about one from ``--video``, and bad files fail with errors naming them."""

from __future__ import annotations

import base64
import io
import logging
import os
from fractions import Fraction

import av
import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.chat.template import ChatTemplate
from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.cli.main import main
from kimi_jax.media.placeholders import conversation_media, expand_media_placeholders
from kimi_jax.media.preprocess import (
    PreprocessConfig,
    preprocess_media,
    split_video_chunks,
    timestamp_as_str,
)
from kimi_jax.media.tokens import num_media_tokens
from kimi_jax.media.video import DEFAULT_MAX_FRAMES, load_video, probe_video
from kimi_jax.testing.demo import DEMO_VOCAB_SIZE, write_tokenizer
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

CFG = PreprocessConfig()  # K2.5's: 2 fps, chunks of 4, hh:mm:ss.fff
H264 = "libx264" if "libx264" in av.codecs_available else "mjpeg"


def color(i: int) -> tuple[int, int, int]:
    """Frame i's solid colour: far from every other frame's (after 4:2:0 compression too)."""
    return ((i * 67) % 200 + 28, (i * 131 + 50) % 200 + 28, (i * 29 + 100) % 200 + 28)


def encode(path, codec: str, fps: int, n: int, size=(64, 48), times_ms=None, fmt=None):
    """``n`` frames of ``color(i)`` at ``fps`` (or at the presentation times ``times_ms``)."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if times_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), color(i), np.uint8), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as f:
        return [frame.to_ndarray(format="rgb24") for frame in f.decode(video=0)]


def which_color(frame: np.ndarray, n: int) -> int:
    mean = frame.reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(mean - color(j)).max() for j in range(n)]))


VFR_MS = [0, 100, 150, 400, 450, 1000, 1100, 1200, 1500, 1600, 1800, 2000, 2100, 2200, 2250, 2300, 2600, 2700,
          2900, 3000]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return dict(
        h264=encode(d / "h264_25fps.mp4", H264, 25, 75),                # 3 s, B-frames with libx264
        mpeg4=encode(d / "mpeg4_10fps.mkv", "mpeg4", 10, 40),           # 4 s; mkv keeps no frame count
        slow=encode(d / "mjpeg_1fps.avi", "mjpeg", 1, 6),               # slower than sample_fps: every frame
        vfr=encode(d / "vfr.mp4", H264, 30, len(VFR_MS), times_ms=VFR_MS),
        big=encode(d / "big.mp4", "mpeg4", 10, 12, size=(130, 98)),     # resized under a small patch budget
    )


# ----------------------------------------------------------------------- sampling rules


@pytest.mark.parametrize("name, fps, n, indices, stamps", [
    # k = max(round(n * min(2, fps) / fps), 1) frames at np.linspace(0, n - 1, k).round(); chunk start = index / fps
    ("h264", 25, 75, [0, 15, 30, 44, 59, 74], ["00:00:00.000", "00:00:02.359"]),  # 59 / 25 as the reference prints it
    ("mpeg4", 10, 40, [0, 6, 11, 17, 22, 28, 33, 39], ["00:00:00.000", "00:00:02.200"]),
    ("slow", 1, 6, [0, 1, 2, 3, 4, 5], ["00:00:00.000", "00:00:04.000"]),
])
def test_sampling_chunks_and_timestamps_follow_the_reference(videos, name, fps, n, indices, stamps):
    info = probe_video(videos[name])
    assert (info.num_frames, info.fps, info.width, info.height) == (n, fps, 64, 48)
    assert info.frame_times == pytest.approx([i / fps for i in range(n)], abs=1e-3)
    chunks = load_video(videos[name])
    assert [i for c in chunks for i in c.frame_indices] == indices
    assert [len(c.frame_indices) for c in chunks] == [4, len(indices) - 4]
    assert [c.timestamp_text for c in chunks] == stamps
    assert [c.frame_times for c in chunks] == [pytest.approx([i / fps for i in c.frame_indices], abs=1e-3)
                                               for c in chunks]
    for c in chunks:
        assert c.prompt == f"{c.timestamp_text}<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"
        for i, frame in zip(c.frame_indices, c.frames):
            assert frame.shape == (48, 64, 3) and which_color(frame, n) == i
            assert np.abs(frame.reshape(-1, 3).mean(0) - color(i)).max() < 8
    # Seek-based decoding gives exactly the frames of a full decode, split as frames + fps.
    everything = decode_all(videos[name])
    assert len(everything) == n
    reference = split_video_chunks(everything, fps, CFG)
    assert [(c.frame_indices, c.timestamp_text) for c in chunks] == [
        (c.frame_indices, c.timestamp_text) for c in reference]
    for got, want in zip(chunks, reference):
        assert all(np.array_equal(a, b) for a, b in zip(got.frames, want.frames))


def test_variable_frame_rate(videos):
    """Frames are counted in presentation order and picked by index, as the reference does, at
    the stream's average rate (about 20 frames over 2.9 s); frame_times are the real times."""
    info = probe_video(videos["vfr"])
    assert info.frame_times == pytest.approx([t / 1000 for t in VFR_MS], abs=1e-3)
    with av.open(str(videos["vfr"])) as f:
        fps = float(f.streams.video[0].average_rate)
    assert info.fps == fps and 6.5 < fps < 7.2
    chunks = load_video(videos["vfr"])
    k = round(20 * 2 / fps)
    indices = np.linspace(0, 19, k).round().astype(int).tolist()
    assert [i for c in chunks for i in c.frame_indices] == indices == [0, 4, 8, 11, 15, 19]
    assert [c.timestamp_text for c in chunks] == ["00:00:00.000", timestamp_as_str(15 / fps)]  # ~2.16 s, not 2.3
    assert chunks[1].timestamp_text.startswith("00:00:02.1")
    assert [t for c in chunks for t in c.frame_times] == pytest.approx([VFR_MS[i] / 1000 for i in indices], abs=1e-3)
    for c in chunks:
        for i, frame in zip(c.frame_indices, c.frames):
            assert which_color(frame, 20) == i


def test_time_range_and_frame_limit(videos, caplog):
    # [1, 2) s of the 25 fps video: frames 25..49 sampled as a video of their own, timestamps absolute.
    chunks = load_video(videos["h264"], start=1.0, end=2.0)
    assert [c.frame_indices for c in chunks] == [(25, 49)]
    assert chunks[0].timestamp_text == "00:00:01.000"
    assert [which_color(f, 75) for f in chunks[0].frames] == [25, 49]
    tail = load_video(videos["mpeg4"], start=2.0)
    assert [i for c in tail for i in c.frame_indices] == [20, 26, 33, 39]
    # A frame limit: frames spread evenly by the same rule, with a warning saying how.
    with caplog.at_level(logging.WARNING, logger="kimi_jax.media.video"):
        limited = load_video(videos["h264"], max_frames=3)
    assert [c.frame_indices for c in limited] == [(0, 37, 74)]
    assert "would take 6 frames" in caplog.text and "sampled 3 frames evenly" in caplog.text
    assert "h264_25fps.mp4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimi_jax.media.video"):
        load_video(videos["h264"])  # 6 frames, under the default limit: no warning
    assert caplog.text == "" and DEFAULT_MAX_FRAMES == 512
    capped = PreprocessConfig(max_num_frames_each_video=2)  # the config's own cap applies too
    assert [c.frame_indices for c in load_video(videos["h264"], capped)] == [(0, 74)]


def test_resized_frames_and_sources(videos, tmp_path):
    """Frames shrunk at decode time give exactly what preprocessing the full frames gives; bytes,
    data: URLs and file:// paths read the same video."""
    cfg = PreprocessConfig(in_patch_limit_each_frame=20)  # 130 x 98 is 9 x 7 patches: resized
    chunks = load_video(videos["big"], cfg)
    assert chunks[0].frames[0].shape[:2] != (98, 130)
    reference = split_video_chunks(decode_all(videos["big"]), 10, cfg)
    got, want = preprocess_media(chunks, cfg), preprocess_media(reference, cfg)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])

    raw = videos["mpeg4"].read_bytes()
    by_path = load_video(videos["mpeg4"])
    for source in (raw, "data:video/x-matroska;base64," + base64.b64encode(raw).decode(),
                   f"file://{videos['mpeg4']}"):
        same = load_video(source)
        assert [c.frame_indices for c in same] == [c.frame_indices for c in by_path]
        assert all(np.array_equal(a, b) for x, y in zip(same, by_path) for a, b in zip(x.frames, y.frames))


# ----------------------------------------------------------------------- bad input


def bad_videos(d, videos) -> list[tuple[object, str]]:
    (d / "notes.txt").write_text("not a video")
    (d / "empty.mp4").write_bytes(b"")
    (d / "folder.mp4").mkdir()
    data = videos["h264"].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    with av.open(str(d / "silence.wav"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with av.open(str(d / "no_frames.avi"), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    mkv = videos["mpeg4"].read_bytes()
    assert mkv.count(b"V_MPEG4/ISO/ASP") == 1
    (d / "unknown_codec.mkv").write_bytes(mkv.replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ASP"))
    return [
        (d / "missing.mp4", r"cannot read video '.*missing\.mp4': file does not exist"),
        (d / "folder.mp4", r"folder\.mp4': is a directory"),
        (d / "empty.mp4", r"empty\.mp4': the file is empty"),
        (d / "notes.txt", r"notes\.txt': not a video format FFmpeg can read"),
        (d / "truncated.mp4", r"truncated\.mp4': not a video format FFmpeg can read, or corrupt or truncated"),
        (d / "silence.wav", r"silence\.wav': the file has no video stream"),
        (d / "no_frames.avi", r"no_frames\.avi': it has no frames \(zero length\)"),
        (d / "unknown_codec.mkv", r"unknown_codec\.mkv': unsupported codec"),
        (b"", r"<0 bytes>: it is empty"),
        ("data:video/mp4;base64,!!", "bad base64"),
        ("https://example.com/clip.mp4", "remote video"),
    ]


def test_bad_files_raise_errors_naming_them(videos, tmp_path):
    for source, match in bad_videos(tmp_path, videos):
        with pytest.raises(ValueError, match=match):
            load_video(source)
        if isinstance(source, os.PathLike):
            with pytest.raises(ValueError, match=match):
                probe_video(source)
    ranges = [
        (dict(start=5.0), r"h264_25fps\.mp4': start 5.0 s is outside the video \(the video lasts 3.000 s\)"),
        (dict(end=4.0), r"end 4.0 s is outside the video \(the video lasts 3.000 s\)"),
        (dict(start=2.0, end=1.0), "end 1.0 s is not after start 2.0 s"),
        (dict(start=-1.0), "start -1.0 s is negative"),
        (dict(start=1.01, end=1.02), r"no frame is shown in \[1.01, 1.02\) s"),
        (dict(max_frames=0), "max_frames must be a positive integer"),
    ]
    for options, match in ranges:
        with pytest.raises(ValueError, match=match):
            load_video(videos["h264"], **options)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.mp4"
        locked.write_bytes(videos["h264"].read_bytes())
        locked.chmod(0)
        with pytest.raises(ValueError, match="locked.mp4': permission denied"):
            load_video(locked)
    part = {"role": "user", "content": [{"type": "video", "video": str(tmp_path / "notes.txt")}]}
    with pytest.raises(ValueError, match=r"message 0, part 0 \(video\): cannot read video .*notes\.txt'"):
        conversation_media([part])


# ----------------------------------------------------------------------- a tiny K2.5 model

TEXT = dict(vocab_size=DEMO_VOCAB_SIZE, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
            max_position_embeddings=2048)
VISION = dict(vt_hidden_size=32, vt_intermediate_size=48, vt_num_attention_heads=2, vt_num_hidden_layers=1,
              mm_hidden_size=32, init_pos_emb_height=6, init_pos_emb_width=6, init_pos_emb_time=4)
FAST = ["--dtype", "float32", "--max-new-tokens", "2", "--mode", "instant"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_k25")
    src = write_checkpoint(work / "hf", k25_config(TEXT, VISION), seed=3, dtype="float32")
    write_tokenizer(src, DEMO_VOCAB_SIZE)
    converted = kimi_jax.convert(src, work / "converted", dtype="float32", progress=False)
    return kimi_jax.load(converted), converted


def test_video_part_tokens_match_placeholders(tiny, videos):
    """A video file part: the template's text with the chunk prompts, one placeholder per medium
    expanded to the chunk's token count; the same as the token-id route with the chunks' pixels."""
    model, converted = tiny
    chat = [{"role": "user", "content": [{"type": "video", "video": str(videos["mpeg4"]), "start": 0.5},
                                         {"type": "text", "text": "What colours?"}]}]
    [result] = kimi_jax.generate(model, [chat], tokenizer=converted, mode="instant", max_new_tokens=2,
                                 temperature=0.0, cache_dtype=jnp.float32)
    chunks = load_video(videos["mpeg4"], start=0.5)
    # frames 5, 11, 16, 22 | 28, 33, 39; 28 / 10 prints as 02.799, as the reference's int((t % 1) * 1000) does
    assert [c.timestamp_text for c in chunks] == ["00:00:00.500", "00:00:02.799"]
    tokenizer = Tokenizer.from_dir(converted)
    text = ChatTemplate.from_dir(converted).render(chat, thinking=False)
    text = text.replace("<|kimi_k25_video_placeholder|>", "".join(c.prompt for c in chunks))
    pixel_values, grid_thws = preprocess_media(chunks)
    assert grid_thws.tolist() == [[4, 4, 6], [3, 4, 6]]  # 48 x 64 padded to 56 x 84
    ids = expand_media_placeholders(tokenizer.encode(text), grid_thws, placeholder_id=tokenizer.media_pad_id)
    assert result.prompt_ids == ids.tolist()
    assert result.prompt_ids.count(tokenizer.media_pad_id) == int(num_media_tokens(grid_thws).sum()) == 12
    [same] = kimi_jax.generate(model, [tokenizer.encode(text)], pixel_values=pixel_values, grid_thws=grid_thws,
                               max_new_tokens=2, temperature=0.0, cache_dtype=jnp.float32)
    assert result.token_ids == same.token_ids


def test_cli_generate_and_chat_with_a_video(tiny, videos, capsys, monkeypatch, tmp_path):
    model, converted = tiny
    video = str(videos["h264"])
    assert main(["generate", str(converted), "--prompt", "What happens?", "--video", video, *FAST]) == 0
    out, err = capsys.readouterr()
    tokenizer = Tokenizer.from_dir(converted)
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = ChatTemplate.from_dir(converted).render(chat, thinking=False).replace(
        "<|kimi_k25_video_placeholder|>", "".join(c.prompt for c in load_video(video)))
    expected = len(tokenizer.encode(text)) + 2 * (6 - 1)  # two chunks of 2 x 3 tokens each
    assert out.startswith("[answer]") and f"[{expected} prompt tokens" in err

    assert main(["generate", str(converted), "--prompt", "?", "--video", video, "--video-start", "1",
                 "--video-end", "2", "--video-max-frames", "8", *FAST]) == 0
    assert "[" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("text")
    for args, match in [
        (["--video", str(tmp_path / "missing.mp4")], "cannot read video '.*missing.mp4': file does not exist"),
        (["--video", str(tmp_path / "notes.txt")], "notes.txt': not a video format"),
        (["--video", video, "--video-start", "9"], "start 9.0 s is outside the video"),
        (["--video", video, "--raw"], "--video needs a chat prompt"),
    ]:
        assert main(["generate", str(converted), "--prompt", "Hi", *args, *FAST]) == 2
        assert __import__("re").search(match, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["generate", str(converted), "--prompt", "Hi", "--video", video, "--video-max-frames", "0"])
    capsys.readouterr()

    calls = []
    generate = kimi_jax.generate

    def spy(model, prompts, **kwargs):
        calls.append(prompts[0])
        return generate(model, prompts, **kwargs)

    monkeypatch.setattr(kimi_jax, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/video nowhere.mp4\n/video {video}\nWhat is it?\nAnd?\n"))
    assert main(["chat", str(converted), "--video-end", "2.5", *FAST]) == 0
    out = capsys.readouterr().out
    assert "error: cannot read video 'nowhere.mp4'" in out and f"attached {video}" in out
    first, second = calls[0][0], calls[1][2]
    assert first["content"] == [{"type": "video", "video": video, "end": 2.5, "max_frames": DEFAULT_MAX_FRAMES},
                                {"type": "text", "text": "What is it?"}]
    assert second == {"role": "user", "content": "And?"}
