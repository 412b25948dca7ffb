"""Read throughput of our ranged safetensors reader vs boto3's own ``download_file``.

Reads a whole real checkpoint (SmolLM2-135M, bf16) tensor by tensor through
``read_tensors`` — from local disk and from a moto S3 server on 127.0.0.1 — and, in the same
run, the same objects with the reference path (a plain file read locally; boto3
``download_file`` from S3). Prints MB/s medians and the ratio ours / reference.

    python benchmarks/read_throughput.py [--repeats 5] [--per tensor layer file]

``--per`` is how many tensors one reader call asks for: one tensor, one layer (what a merge
task reads), or a whole file. Note on moto: its server copies the *whole object* for every
ranged GET, so the per-request cost grows with the shard size; real S3 serves a range in time
proportional to the range. Small-range modes are therefore pessimistic against moto.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3

from mediator_ray.checkpoint import open_checkpoint, read_tensors
from mediator_ray.storage import StorageOptions, open_store
from mediator_ray.testing.smollm2 import smollm2_checkpoint

CACHE = Path(__file__).resolve().parent / ".cache"


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn`` over ``repeats`` runs, and the bytes it reported."""
    times, nbytes = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        nbytes = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), nbytes


def read_checkpoint_with_our_reader(uri: str, per: str, options: StorageOptions) -> int:
    """Read every tensor; ``per`` sets how many tensors one ``read_tensors`` call asks for."""
    catalog = open_checkpoint(uri, options)
    total = 0
    refs = list(catalog.tensors.values())
    if per == "tensor":
        groups = [[ref] for ref in refs]
    elif per == "layer":
        groups = [catalog.refs(layer) for layer in catalog.layers]
    else:  # file
        groups = [[r for r in refs if r.file == file] for file in catalog.files]
    for refs in groups:
        tensors = read_tensors(catalog.store, refs)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total


def read_files_plainly(folder: Path, files: list[str]) -> int:
    total = 0
    for name in files:
        total += len((folder / name).read_bytes())
    return total


def download_with_boto3(bucket: str, prefix: str, files: list[str], endpoint: str) -> int:
    client = boto3.client("s3", endpoint_url=endpoint)
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            target = os.path.join(tmp, name)
            client.download_file(bucket, f"{prefix}/{name}", target)
            total += os.path.getsize(target)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--per", nargs="+", choices=["tensor", "layer", "file"], default=["tensor", "layer", "file"]
    )
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    folder = smollm2_checkpoint(CACHE, "bfloat16")
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    options = StorageOptions(concurrency=args.concurrency)

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # moto in its own process, as a real S3 endpoint would be: an in-process server would
    # share the GIL with the clients being measured.
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3_options = options.model_copy(update={"endpoint_url": endpoint})
        s3 = open_store("s3://bench/smollm2", s3_options)
        local = open_store(str(folder))
        for key in local.list():
            s3.write(key, local.read(key))

        rows = []
        t_ref, n_ref = timed(lambda: read_files_plainly(folder, files), args.repeats)
        for per in args.per:
            t, n = timed(
                lambda per=per: read_checkpoint_with_our_reader(str(folder), per, options),
                args.repeats,
            )
            rows.append(("local", per, n / t, n_ref / t_ref, "plain file read"))
        t_ref, n_ref = timed(
            lambda: download_with_boto3("bench", "smollm2", files, endpoint), args.repeats
        )
        for per in args.per:
            t, n = timed(
                lambda per=per: read_checkpoint_with_our_reader(
                    "s3://bench/smollm2", per, s3_options
                ),
                args.repeats,
            )
            rows.append(("s3 (moto)", per, n / t, n_ref / t_ref, "boto3 download_file"))
    finally:
        server.terminate()
        server.wait()

    mb = 1e6
    print(
        f"checkpoint: {folder.name}, {len(files)} file(s), repeats={args.repeats} (medians), "
        f"concurrency={args.concurrency}"
    )
    print(f"{'source':<10} {'per call':<8} {'ours MB/s':>10} {'ref MB/s':>9} {'ratio':>6}  ref")
    for source, per, ours, ref, ref_name in rows:
        print(
            f"{source:<10} {per:<8} {ours / mb:>10.1f} {ref / mb:>9.1f} {ours / ref:>6.2f}  "
            f"{ref_name}"
        )


if __name__ == "__main__":
    main()
