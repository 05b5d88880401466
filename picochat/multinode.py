"""Multi-node runs: every node must see the same `$PICOCHAT_HOME`, and this checks it at start-up.

Global rank 0 alone writes the tokenizer, the checkpoints and the report data, and every rank of every
node reads them (the trainer loads the tokenizer, the next stage loads the checkpoint). On one node that
is one disk; across nodes it needs a shared filesystem (NFS, Lustre, a cloud file share) mounted on every
node with PICOCHAT_HOME pointing into it. Without one, a later node would fail an hour in with "no
tokenizer" or "no checkpoint", or, worse, train from a stale copy of its own.

So when torchrun starts more than one node (WORLD_SIZE > LOCAL_WORLD_SIZE), `require_shared_home` has
global rank 0 write a marker with a fresh random token under PICOCHAT_HOME, all ranks meet at a barrier,
the first process of every node reads the marker back, and the verdict is all-reduced so that every rank
of every node stops with the same clear error, naming the nodes that cannot see node 0's files.
"""

from __future__ import annotations

import os
import secrets

import torch
import torch.distributed as dist

from picochat.common import PicochatError, atomic_write_text, get_base_dir

MARKER = "multinode_check.txt"


def is_multinode() -> bool:
    """True under torchrun with processes on more than one node."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", world))


def require_shared_home(device: torch.device) -> None:
    """On a multi-node run, raise PicochatError on every rank unless every node sees node 0's files under
    PICOCHAT_HOME. A no-op on one node or without a process group."""
    if not (is_multinode() and dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("GROUP_RANK", rank // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    home = get_base_dir()
    path = home / MARKER
    token = secrets.token_hex(16) if rank == 0 else ""
    if rank == 0:
        atomic_write_text(path, token)
    shared = [token]
    dist.broadcast_object_list(shared, src=0)  # also the barrier: rank 0 has written the marker by now
    blind = torch.zeros(world, dtype=torch.long, device=device)
    if local_rank == 0:
        try:
            seen = path.read_text().strip()
        except OSError:
            seen = ""
        blind[rank] = node + 1 if seen != shared[0] else 0
    dist.all_reduce(blind)
    if rank == 0:
        path.unlink(missing_ok=True)
    nodes = sorted(int(n) - 1 for n in blind.tolist() if n)
    if nodes:
        raise PicochatError(
            f"node(s) {', '.join(map(str, nodes))} cannot see the files node 0 writes under PICOCHAT_HOME "
            f"({home} on node 0): rank 0 alone writes the tokenizer and checkpoints, so a multi-node run "
            "needs one shared filesystem; mount it on every node and point PICOCHAT_HOME into it"
        )
