"""``edgevlm serve MODEL``: Triton Inference Server in front of a Pipeline."""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from pathlib import Path

from edgevlm.cli_args import add_model_args, vision_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model through Triton Inference Server (HTTP, gRPC streaming, metrics)",
        description="Write a Triton model repository for MODEL (a batched model `edgevlm` and a streaming model "
        "`edgevlm_stream`, both Python-backend models running a Pipeline) and serve it with the tritonserver "
        "bundled in nvidia-pytriton (pip install 'edgevlm[serve]'). Concurrent requests are batched into one "
        "vision-tower call; the streaming model sends text pieces over gRPC. Health: GET /v2/health/ready on "
        "the HTTP port; Prometheus metrics on the metrics port. Clients: edgevlm.client.Client, or any KServe "
        "v2 / Triton client (tensors: edgevlm.serving.protocol). Ctrl-C or SIGTERM stops the server.")
    p.add_argument("model", nargs="?", default="demo", metavar="MODEL",
                   help="preset name, edgevlm checkpoint folder, transformers folder or .gguf file (default: demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=8, help="most requests batched into one call (default: 8)")
    p.add_argument("--batch-delay-ms", type=float, default=2.0,
                   help="how long a request may wait for others to batch with (default: 2 ms)")
    p.add_argument("--instances", type=int, default=1,
                   help="Pipelines per model, each its own process and memory (default: 1)")
    p.add_argument("--no-stream", action="store_true", help="leave out the streaming model (one Pipeline less)")
    p.add_argument("--openai-port", type=int, default=0,
                   help="also serve an OpenAI-compatible POST /v1/chat/completions (image_url data: URLs; stream: "
                   "true as server-sent events) on this port (default: 0 = off)")
    p.add_argument("--repo", default=None, help="write the model repository here and keep it (default: a temporary "
                   "folder); a stock tritonserver can serve it later with --model-repository")
    p.add_argument("--verbose", action="store_true", help="Triton's verbose log")
    add_model_args(p, model_flag=False)
    p.set_defaults(func=cmd_serve)


def cmd_export_triton_repo(args: argparse.Namespace) -> int:
    """``edgevlm export SRC --to triton-repo --out DIR``."""
    from .repository import write_pipeline_repository

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        from edgevlm.errors import ConfigError

        raise ConfigError(f"{out} exists and is not empty; pass --force to write into it")
    write_pipeline_repository(args.source, out, precision=args.precision, tower_backend=args.tower_backend,
                              progress=not args.json)
    models = sorted(p.name for p in out.iterdir() if (p / "config.pbtxt").is_file())
    if args.json:
        print(json.dumps({"repository": str(out), "models": models}))
    else:
        print(f"wrote a Triton model repository to {out}: models {', '.join(models)}\n"
              f"  serve it: tritonserver --model-repository={out}   (its Python backend must import edgevlm)")
    return 0


def load_options(args: argparse.Namespace) -> dict:
    """The ``edgevlm.load`` keyword arguments the model flags stand for (JSON values only)."""
    opts = {"device": args.device, "dtype": args.dtype, "quant": args.quant, "max_context": args.max_context,
            "kv_cache": args.kv_cache, "decode_graphs": args.decode_graphs, "preprocess_backend": args.preprocess,
            **vision_kwargs(args)}
    return {k: v for k, v in opts.items() if v is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    from .repository import write_repository
    from .server import TritonServer

    tmp = None
    if args.repo is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgevlm-repo-")
        repo = Path(tmp.name)
    else:
        repo = Path(args.repo)
    write_repository(args.model, repo, options=load_options(args), max_batch_size=args.max_batch,
                     batch_delay_us=int(args.batch_delay_ms * 1000), instances=args.instances,
                     stream=not args.no_stream)
    server = TritonServer(repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=1 if args.verbose else 0)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"edgevlm serve: loading {args.model} into Triton (repository {repo}) ...", flush=True)
    t0 = time.perf_counter()
    try:
        with server:
            openai = None
            if args.openai_port:
                from .openai import OpenAIServer

                openai = OpenAIServer(server.http_url, server.grpc_url, host=args.host, port=args.openai_port,
                                      model_name=str(args.model)).start()
            print(json.dumps({"ready_s": round(time.perf_counter() - t0, 1), "model": args.model,
                              "http": server.http_url, "grpc": server.grpc_url,
                              "metrics": f"{args.host}:{args.metrics_port}/metrics",
                              "models": ["edgevlm"] + ([] if args.no_stream else ["edgevlm_stream"]),
                              **({"openai": f"{openai.url}/v1/chat/completions"} if openai else {}),
                              "log": str(server.log_path)}), flush=True)
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(0.5)
            print(f"edgevlm serve: tritonserver exited ({server.proc.returncode if server.proc else '?'}):\n"
                  f"{server.log_tail()}", flush=True)
            return 1
    except KeyboardInterrupt:
        print("edgevlm serve: stopping", flush=True)
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()
