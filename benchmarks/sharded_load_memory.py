"""Peak host memory of a sharded load: two CPU processes x 4 devices vs one process.

Loads a converted checkpoint (e.g. the one ``convert_memory.py`` writes) on the mesh
``data=1,expert=8,tensor=1`` spread over two processes (``jax.distributed`` on localhost),
and once in a single process on one device, and prints each process's peak RSS. On CPU a
device's arrays live in host memory, so a process's RSS is what its devices hold.

    python benchmarks/sharded_load_memory.py /tmp/convert-bench/converted
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys


def worker(checkpoint: str, process_id: int, port: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    from flax import nnx

    import kimi_jax
    from kimi_jax.parallel.distributed import initialize

    initialize(f"127.0.0.1:{port}", 2, process_id)
    model = kimi_jax.load(checkpoint, mesh="data=1,expert=8,tensor=1")
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    held = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
    total = sum(a.nbytes for a in leaves)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"process {process_id}: peak RSS {peak / 1e9:.2f} GB; its 4 devices hold {held / 1e9:.2f} GB "
          f"(replicated arrays once per device) of the model's {total / 1e9:.2f} GB", flush=True)
    jax.distributed.shutdown()


def single(checkpoint: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import kimi_jax

    kimi_jax.load(checkpoint)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"single process, one device: peak RSS {peak / 1e9:.2f} GB", flush=True)


def main() -> None:
    if len(sys.argv) == 4:
        return worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[2] == "single":
        return single(sys.argv[1])
    checkpoint = sys.argv[1]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(checkpoint, "params"))
               for f in fs)
    print(f"checkpoint params on disk: {size / 1e9:.2f} GB")
    subprocess.run([sys.executable, __file__, checkpoint, "single"], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, checkpoint, str(i), str(port)]) for i in range(2)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("a worker failed")


if __name__ == "__main__":
    main()
