"""Spreading the grid over torch.distributed processes (torchrun), each reading only its layers.

Why split by SAE and not by data: every SAE must see the whole token stream, and SAEs never
exchange gradients, so the grid is embarrassingly parallel. Whole layers go to a process when
there are at least as many layers as processes (so each process reads fewer layers); otherwise
the SAEs are cut into contiguous, cost-balanced pieces. The split is a pure function of the grid
and the world size, so every process computes the same one without talking.
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
