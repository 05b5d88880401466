"""A 2-node rehearsal on one machine: `torchrun --nnodes 2 --node-rank 0/1` twice on localhost (gloo).

With one PICOCHAT_HOME (a shared filesystem) the nodes train together; with a home of its own per node
(no shared filesystem) every rank stops at start-up with one clear error instead of failing later."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from picochat.common import REPO_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(homes: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for node, home in enumerate(homes):
        env = {**os.environ, "PICOCHAT_HOME": home, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(REPO_DIR / "tests" / "multinode_worker.py")]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_two_nodes_sharing_picochat_home_run_together(tmp_path):
    nodes = two_nodes([str(tmp_path / "shared")] * 2)
    for node in nodes:
        assert node.returncode == 0, node.stdout + node.stderr
    assert "rank 0 of 2: sum 3" in nodes[0].stdout and "rank 1 of 2: sum 3" in nodes[1].stdout
    assert list((tmp_path / "shared").iterdir()) == []  # the marker is cleaned up


def test_two_nodes_without_a_shared_home_stop_with_one_clear_error(tmp_path):
    nodes = two_nodes([str(tmp_path / "node0"), str(tmp_path / "node1")])
    for node in nodes:
        assert node.returncode != 0
        assert "node(s) 1 cannot see the files node 0 writes under PICOCHAT_HOME" in node.stderr, node.stderr
        assert "shared filesystem" in node.stderr
    assert "sum" not in nodes[0].stdout + nodes[1].stdout
