"""Start one Ray worker node on 127.0.0.1 and block: ``ray start --address … --block``, on loopback.

Why not ``ray start``: on one machine we keep Ray on loopback with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and ``ray start --address`` refuses to add a node in
that mode; with the switch at 1 it rewrites ``127.0.0.1`` (the head's address and this node's)
to the machine's external address, which the loopback-only head does not listen on. Ray's own
helper for multi-node clusters on one machine (``ray.cluster_utils.Cluster``, also behind the
test suite's ``ray_cluster`` fixture) starts nodes through ``ray._private.node.Node`` instead;
this does the same, with the ports and sizes start.sh chooses.

SIGTERM shuts the node's processes down (the handler ``Node`` installs), as for ``ray start``.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="GCS address of the head, host:port")
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--object-store-memory", type=int, default=300_000_000)
    parser.add_argument("--dashboard-agent-listen-port", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args(argv)

    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=args.address,
        node_ip_address="127.0.0.1",
        num_cpus=args.num_cpus,
        num_gpus=0,
        object_store_memory=args.object_store_memory,
        dashboard_agent_listen_port=args.dashboard_agent_listen_port,
        temp_dir=args.temp_dir,
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
        include_log_monitor=False,  # one log monitor per machine: the head's
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"Ray worker node {node.node_id} joined {args.address} on 127.0.0.1", flush=True)
    while True:
        time.sleep(1)
        dead = [kind for kind, _ in node.dead_processes()]
        if dead:
            print(f"Ray worker node processes exited: {dead}; shutting down", flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            return 1


if __name__ == "__main__":
    sys.exit(main())
