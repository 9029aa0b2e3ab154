"""Spreading the grid over torch.distributed processes (torchrun), each reading only its layers.

Why split by SAE and not by data: every SAE must see the whole token stream, and SAEs never
exchange gradients, so the grid is embarrassingly parallel. Whole layers go to a process when
there are at least as many layers as processes (so each process reads fewer layers); otherwise
the SAEs are cut into contiguous, cost-balanced pieces. The split is a pure function of the grid
and the world size, so every process computes the same one without talking.

What "each rank reads its share of the batches" means here: a rank reads the batches of its own
layers, and only those chunk files (from a local disk or, each rank with its own client, straight
from the object store). With at least as many layers as ranks every byte of the cache is read by
exactly one rank, and nothing crosses the network between ranks during training: no per-step
collective, results bit-identical to one process (tested with gloo, also from S3). Splitting each
batch across ranks instead (data parallel) would read each byte once even for one layer, but every
step would all-reduce every SAE's gradients (for a 16k x 3584 SAE, ~0.5 GB per step) and change
the results with the reduction order; for SAE grids, whose steps are cheap and whose SAEs are many,
that trade is poor. The cost of this design: when ranks outnumber layers, the ranks sharing a layer
each read it (read amplification = ranks per layer).

Multi-node: the usual torch.distributed environment. Two nodes of 8 GPUs, cache in a bucket, run
folder on a file system both nodes share (every rank writes its checkpoint files there):
    node 0: torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr NODE0 --master-port 29500 \
                pipeline.py train s3://bucket/caches/fast --out /shared/runs/fast ...
    node 1: the same with --node-rank 1
NCCL is the GPU backend (each rank on cuda:LOCAL_RANK); only gloo on CPU is tested here (no GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import SAESpec


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Objects of every rank on rank 0 (None elsewhere); just [obj] when not distributed."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # collectives run on the current device: make it this process's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def partition(specs: list[SAESpec], d_in: int, world: int) -> list[list[SAESpec]]:
    """The SAEs each of ``world`` processes trains (some may get none if the grid is tiny)."""
    cost = {s: s.d_sae(d_in) for s in specs}
    parts: list[list[SAESpec]] = [[] for _ in range(world)]
    layers = sorted({s.layer for s in specs})
    if len(layers) >= world:
        load = [0] * world
        by_layer = {layer: [s for s in specs if s.layer == layer] for layer in layers}
        for layer in sorted(layers, key=lambda la: (-sum(cost[s] for s in by_layer[la]), la)):
            r = min(range(world), key=lambda i: (load[i], i))
            parts[r].extend(by_layer[layer])
            load[r] += sum(cost[s] for s in by_layer[layer])
    else:
        total = sum(cost.values())
        acc = 0
        for s in specs:
            r = min(world - 1, int((acc + cost[s] / 2) * world / total))  # by the SAE's midpoint
            parts[r].append(s)
            acc += cost[s]
    order = {s: i for i, s in enumerate(specs)}
    return [sorted(p, key=order.__getitem__) for p in parts]
