"""Runs a function on N real torch.distributed ranks (gloo, CPU processes) for tests."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, backend: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes on a small machine
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args, backend: str = "gloo") -> None:
    """Calls ``fn(rank, world, *args)`` on ``world`` ranks (gloo on CPU, or nccl with one GPU per
    rank); an exception on any rank fails."""
    mp.spawn(_entry, args=(fn, world, free_port(), backend, args), nprocs=world, join=True)
