"""``kimi-jax serve CKPT``: an OpenAI-compatible HTTP server (``kimi_jax.serve``)."""

from __future__ import annotations

import argparse
import sys

from kimi_jax.cli.common import add_parallel_options, checkpoint_path, positive_int

SERVED_MODEL_NAME = "kimi-k2.5"


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [1, 65535], got {text}")
    return value


def run(args: argparse.Namespace) -> None:
    import jax
    import uvicorn

    import kimi_jax
    from kimi_jax.checkpoint.load import checkpoint_info
    from kimi_jax.cli.common import checkpoint_preprocessor, checkpoint_tokenizer
    from kimi_jax.inference.generate import generation_stop_ids
    from kimi_jax.serve import create_app

    if jax.process_count() > 1:
        raise ValueError("serve runs in one process (one engine thread answers the requests); "
                         "use a mesh of this host's devices")
    checkpoint = args.checkpoint
    checkpoint_info(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint, required=True)
    model = kimi_jax.load(checkpoint, dtype=args.dtype, mesh=args.mesh)
    app = create_app(
        model, tokenizer, served_model_name=args.served_model_name, max_slots=args.max_slots,
        max_length=args.max_length, prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
        cache_dtype=args.cache_dtype, preprocessor=checkpoint_preprocessor(checkpoint),
        stop_ids=generation_stop_ids(checkpoint),
    )
    print(f"serving {checkpoint} as {args.served_model_name!r} on http://{args.host}:{args.port}/v1 "
          f"({args.max_slots} slots x {args.max_length} tokens)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        app.state.server.worker.stop()


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat completions, completions, tools)")
    add_parallel_options(p)
    p.add_argument("checkpoint", type=checkpoint_path, help="converted checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", default=SERVED_MODEL_NAME,
                   help=f"the model name clients send (default: {SERVED_MODEL_NAME})")
    p.add_argument("--max-slots", type=positive_int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-length", type=positive_int, default=4096,
                   help="tokens per slot: prompt plus reply (default: 4096)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests that may wait for a slot; more get 429 (default: 64)")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameters and activations (default: the checkpoint's)")
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
