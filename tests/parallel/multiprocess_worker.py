"""One process of the two-process test (run by tests/test_multiprocess.py, not by pytest).

Usage: python multiprocess_worker.py CHECKPOINT OUT_FILE PROCESS_ID PORT MESH
Each process has 4 CPU devices; together they form one 8-device mesh.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import kimi_jax  # noqa: E402
from kimi_jax.parallel.distributed import initialize  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    checkpoint, out_file, process_id, port, mesh = sys.argv[1:]
    initialize(f"127.0.0.1:{port}", 2, int(process_id))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    model = kimi_jax.load(checkpoint, mesh=mesh)
    experts = model.language_model.runs[-1].mlp.experts.gate_proj  # [layers, experts, ...]
    local_rows = sum(s.data.shape[1] for s in experts.addressable_shards)
    ids = np.load(os.path.join(os.path.dirname(out_file), "ids.npy"))
    logits = multihost_utils.process_allgather(model(ids), tiled=True)
    prompts = [list(map(int, ids[0])), list(map(int, ids[1][:4]))]
    gen = [r.token_ids for r in kimi_jax.generate(model, prompts, max_new_tokens=5, temperature=0.0)]
    if jax.process_index() == 0:
        np.savez(out_file, logits=np.asarray(logits), gen=np.asarray(gen), local_rows=local_rows)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
