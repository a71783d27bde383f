"""Two processes x 4 CPU devices (jax.distributed on localhost) equal the single-process model."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kimi_jax
from kimi_jax.parallel.layout import load_layout
from kimi_jax.testing.synthetic import k25_config, write_checkpoint

pytestmark = [pytest.mark.subprocess, pytest.mark.mesh]

TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=8, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16, num_experts_per_tok=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mesh", ["data=1,expert=4,tensor=2", "data=1,expert=8,tensor=1", "data=2,expert=4,tensor=1"])
def test_two_processes_equal_one(tmp_path, mesh):
    src = write_checkpoint(tmp_path / "hf", k25_config(TEXT, multimodal=False), seed=7, dtype="float32")
    ckpt = kimi_jax.convert(src, tmp_path / "converted", dtype="float32", progress=False)
    ids = np.random.default_rng(1).integers(0, 240, (2, 9))
    np.save(tmp_path / "ids.npy", ids)
    model = kimi_jax.load(ckpt)
    ref_logits = np.asarray(model(ids))
    ref_gen = [r.token_ids for r in kimi_jax.generate(model, [list(ids[0]), list(ids[1][:4])],
                                                      max_new_tokens=5, temperature=0.0)]
    worker = Path(__file__).with_name("multiprocess_worker.py")
    out, port = tmp_path / "out.npz", str(free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), str(ckpt), str(out), str(i), port, mesh],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = np.load(out)
    assert np.abs(result["logits"] - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
    assert result["gen"].tolist() == ref_gen
    experts_per_device = TEXT["n_routed_experts"] // load_layout(mesh).axis_size("expert")
    assert int(result["local_rows"]) == 4 * experts_per_device  # this process holds only its devices' experts
