"""Memory estimate for a grid, printed before training; grids that cannot fit are refused.

Why estimate instead of trying: a grid that runs out of memory an hour in wastes the hour (and on
a shared machine may take other jobs down). The estimate is deliberately simple and a little
pessimistic: parameters x4 (weights, gradients, two Adam moments) plus the per-step activations
of every SAE plus the data buffers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .buffer import mixing_half
from .config import SAESpec, TrainConfig

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    sae_state: int  # bytes on the training device
    activations: int  # bytes on the training device, per step
    data: int  # bytes of host memory for buffers and prefetch
    device_available: int
    host_available: int

    @property
    def device_total(self) -> int:
        return self.sae_state + self.activations

    def fits(self, same_device: bool) -> bool:
        if same_device:
            return self.device_total + self.data <= self.host_available
        return self.device_total <= self.device_available and self.data <= self.host_available

    def line(self) -> str:
        return (f"memory estimate: {self.sae_state / GIB:.2f} GiB SAE state + {self.activations / GIB:.2f} GiB "
                f"activations + {self.data / GIB:.2f} GiB data buffers "
                f"(available: {self.device_available / GIB:.1f} GiB device, {self.host_available / GIB:.1f} GiB host)")


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def estimate(specs: list[SAESpec], d_in: int, n_layers: int, cfg: TrainConfig) -> MemoryEstimate:
    b = cfg.batch_tokens
    state = acts = 0
    for s in specs:
        d_sae = s.d_sae(d_in)
        params = 2 * d_in * d_sae + 3 * d_sae + d_in
        state += 4 * 4 * params + 8 * d_sae  # fp32 weights, grads, Adam m and v; dead counters
        per_token = 6 * d_sae + 4 * d_in  # pre, features, masks, their gradients; reconstruction
        if s.architecture in ("topk", "batchtopk"):
            per_token += 3 * d_sae  # AuxK pre-activations and its scatter target
        acts += 4 * b * per_token
    if cfg.order == "mixing":
        rows = 5 * mixing_half(cfg.buffer_tokens, b)  # kept + fresh + served half + 2 queued halves
    else:
        rows = 4 * max(b, 1 << 16)
    data = 4 * rows * d_in * n_layers
    host = host_available_bytes()
    device = host
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.mem_get_info()[0]
    if cfg.max_memory_gb is not None:
        host = device = int(cfg.max_memory_gb * GIB)
    return MemoryEstimate(state, acts, data, device, host)
