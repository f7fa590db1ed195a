"""``adasr serve``: upscale images sent over HTTP with a Ray Serve application (``ray[serve]``).

``POST /`` with an image file as the body answers the SR image as PNG (a one-line error and
status 400 for a bad image). The tiles of concurrent requests that go to the same engine are
batched together (:mod:`runtime.cluster.serve`). Listens on 127.0.0.1 by default; runs until
Ctrl-C. Imports only the runtime.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", metavar="ADDRESS",
                   help="the Ray cluster to use: auto or HOST:PORT (default: a local one)")
    p.add_argument("--mode", default="patch", metavar="patch|image",
                   help="one engine per tile (patch, default) or per image")
    p.add_argument("--policy", metavar="POLICY",
                   help="as for adasr run: quality[:DB] (default with a rung ladder), budget:MS, "
                   "threshold or fixed:NAME")
    p.add_argument("--batch", type=int, default=8, help="tiles per engine call (default 8)")
    p.add_argument("--stitch", default="crop", metavar="crop|feather", help="tile seams")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (and CPUs reserved) per engine replica (default 1)")
    p.add_argument("--engine-replicas", type=int, default=1, metavar="N",
                   help="replicas holding the engines (default 1)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="engine calls of concurrent requests merged into one (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a call waits for others to batch with (default 5)")


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from runtime.bundle import open_bundle
    from runtime.cluster.job import connect
    from runtime.cluster.serve import ServeOptions, build_app
    from runtime.cluster.worker import DispatchSettings
    from runtime.errors import ConfigError

    if args.threads < 1 or args.engine_replicas < 1 or args.max_batch < 1 \
            or args.batch_wait_ms < 0:
        raise ConfigError("--threads, --engine-replicas and --max-batch must be >= 1 and "
                          "--batch-wait-ms >= 0")
    open_bundle(args.bundle, any_machine=True)  # a bad bundle fails here, not in a replica
    settings = DispatchSettings(bundle=args.bundle, mode=args.mode, policy=args.policy,
                                batch=args.batch, stitch=args.stitch, threads=args.threads)
    options = ServeOptions(max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                           engine_replicas=args.engine_replicas)
    with connect(args.address):
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(build_app(settings, options), name="adasr", route_prefix="/")
            print(f"adasr serve: POST an image to http://{args.host}:{args.port}/ "
                  "(Ctrl-C stops)", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        finally:
            serve.shutdown()
