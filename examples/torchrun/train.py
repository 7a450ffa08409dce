"""A two-member distributed job for the README's torchrun example: each member is one torchrun "node".

torchrun (started by the job's command with --nnodes=$WORLD_SIZE --node_rank=$NODE_RANK
--master_addr=$MASTER_ADDR --master_port=$MASTER_PORT, the variables every gang member gets) sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for the process it starts; init_process_group("env://")
reads them. gloo runs on CPUs; use "nccl" on GPU members.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def main() -> None:
    backend = os.environ.get("TORCH_BACKEND", "gloo")
    dist.init_process_group(backend, init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank} of world size {world} on {socket.gethostname()} "
          f"(torch {torch.__version__}, backend {backend}, job rank {os.environ.get('JOB_RANK')})", flush=True)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    expected = world * (world + 1) / 2
    print(f"rank {rank}: all_reduce(sum of rank+1) = {value.item():g} (expected {expected:g})", flush=True)
    if value.item() != expected:
        raise SystemExit(f"all_reduce gave {value.item()}, expected {expected}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
