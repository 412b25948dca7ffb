"""Real infrastructure for tests: a moto S3 server and a local Ray cluster, both on 127.0.0.1.

Environment is set at import time — before ``ray`` is imported (Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import, to decide whether 127.0.0.1 may stay
127.0.0.1) and before any Ray worker starts — so workers inherit the loopback-only settings
and the S3 endpoint, exactly as a job's workers would inherit them from a cluster's environment.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import boto3
import pytest

if TYPE_CHECKING:  # ray is imported only after the environment below is set
    from ray.cluster_utils import Cluster


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": S3_ENDPOINT,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's ThreadedMotoServer) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    try:
        yield S3_ENDPOINT
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket for one test; yields ``s3://name``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    """One real two-node Ray cluster on 127.0.0.1 for the whole session, driver connected.

    Two nodes of one CPU each (the machine has two cores), ~500 MB object store each: tasks
    really cross node boundaries, so scheduling, object transfer and per-node storage clients
    are exercised in every Ray test, not just in a dedicated multi-node one.
    """
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 500_000_000, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING")
    os.environ["RAY_ADDRESS"] = cluster.address  # for jobs started as subprocesses
    try:
        yield cluster
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster: Cluster) -> Iterator[str]:
    """Ray Serve on the session cluster, HTTP on 127.0.0.1 (one proxy, on the head node).

    Serve's HTTP options are fixed when it starts, so every Serve test shares this instance
    and deploys its own applications under their own route prefixes.
    """
    from ray import serve

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
