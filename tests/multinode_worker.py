"""A stage-like main for the 2-node rehearsal: joins the process group through distributed_runtime
(which runs the shared-PICOCHAT_HOME check), then all-reduces one number and prints it from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from picochat.common import distributed_runtime, run_cli


def main() -> int:
    with distributed_runtime("cpu") as (rank, world_size, device):
        total = torch.tensor([rank + 1], device=device)
        dist.all_reduce(total)
        print(f"rank {rank} of {world_size}: sum {int(total.item())}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
