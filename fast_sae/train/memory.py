"""Memory estimate for a grid, printed before training; grids that cannot fit are refused.

Why estimate instead of trying: a grid that runs out of memory an hour in wastes the hour (and on
a shared machine may take other jobs down). The estimate is deliberately simple and a little
pessimistic: parameters x4 (weights, gradients, two Adam moments) of every SAE, plus the
activations of the largest stack's step (on its decoder path), plus the data buffers.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .buffer import mixing_half
from .config import SAESpec, TrainConfig
from .saes.sparse import spec_decoder_path

GIB = 1024 ** 3
# A step's fixed costs beside its tensors (BLAS and sort scratch, allocator slack): a few MiB
# measured at tiny sizes, where they exceed the tensors themselves.
STEP_OVERHEAD = 16 * 2 ** 20


@dataclass
class MemoryEstimate:
    sae_state: int  # bytes on the training device
    activations: int  # bytes on the training device: peak of one step (the largest stack's)
    data: int  # bytes of host memory for buffers and prefetch
    device_available: int
    host_available: int
    sparse_saes: int = 0  # SAEs on the sparse decoder path (saes/sparse.py)
    dense_saes: int = 0
    activations_all_dense: int = 0  # the same peak if every stack took the dense path

    @property
    def device_total(self) -> int:
        return self.sae_state + self.activations

    def fits(self, same_device: bool) -> bool:
        if same_device:
            return self.device_total + self.data <= self.host_available
        return self.device_total <= self.device_available and self.data <= self.host_available

    def line(self) -> str:
        paths = f"decoder path: {self.sparse_saes} sparse, {self.dense_saes} dense"
        if self.sparse_saes:
            paths += f"; {self.activations_all_dense / GIB:.2f} GiB if all dense"
        return (f"memory estimate: {self.sae_state / GIB:.2f} GiB SAE state + {self.activations / GIB:.2f} GiB "
                f"step activations ({paths}) + {self.data / GIB:.2f} GiB data buffers "
                f"(available: {self.device_available / GIB:.1f} GiB device, {self.host_available / GIB:.1f} GiB host)")


def step_activation_bytes(architecture: str, d_in: int, d_sae: int, k_max: int, batch: int, path: str,
                          k_aux: int) -> int:
    """Peak bytes of one SAE's training step beyond its state (weights, gradients, Adam moments).

    Dense path, per token (fp32): pre-activations, features, their gradients and masks (6 x d_sae),
    AuxK's masked pre-activations, features and gradient (3 x d_sae) for the TopK family, and the
    batch-sized tensors of the loss, the logging accumulators and clipping (12 x d_in).
    Sparse path, per token: the one pre-activation matrix (d_sae); AuxK on the dead columns (at
    most d_sae / 2 of them: their pre-activations, features and the features' gradient, 3 x d_sae / 2;
    with more dead latents AuxK takes sparse entries instead); the same 12 x d_in; ~64 bytes per
    kept entry (k_max, plus k_aux for AuxK: values, indices, the pattern and its transpose); plus
    two d_sae x d_in temporaries of the encoder gradient. Checked against the process's peak
    resident memory in tests/train/test_sparse.py and bench/train.py --sections topk.
    """
    topk_family = architecture in ("topk", "batchtopk")
    if path == "sparse":
        per_token = 4 * (d_sae + 3 * d_sae // 2 + 12 * d_in) + 64 * (k_max + k_aux)
        return batch * per_token + 8 * d_sae * d_in
    per_token = 4 * (6 * d_sae + 12 * d_in + (3 * d_sae if topk_family else 0))
    return batch * per_token


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
    """Memory for training ``specs`` in one process. Stacks (same layer, architecture, width and
    decoder path, as the trainer forms them) take their steps one after another and free their
    activations in between, so the activation peak is the largest stack's, not the sum."""
    b = cfg.batch_tokens
    state = 0
    stacks: dict[tuple[int, str, int, str], list[SAESpec]] = {}
    for s in specs:
        d_sae = s.d_sae(d_in)
        params = 2 * d_in * d_sae + 3 * d_sae + d_in
        state += 4 * 4 * params + 8 * d_sae  # fp32 weights, grads, Adam m and v; dead counters
        path = spec_decoder_path(s, d_in, cfg.decoder_path)
        stacks.setdefault((s.layer, s.architecture, s.expansion_factor, path), []).append(s)
    acts = workspace = 0
    n_sparse = 0
    dense_stacks: dict[tuple[int, str, int], list[SAESpec]] = {}  # the stacks if every path were dense
    for (layer, arch, ef, path), members in stacks.items():
        d_sae, k_max = ef * d_in, max(s.k or 0 for s in members)
        k_aux = min(cfg.aux_k or d_in // 2, d_sae)
        n = len(members)
        acts = max(acts, n * step_activation_bytes(arch, d_in, d_sae, k_max, b, path, k_aux))
        dense_stacks.setdefault((layer, arch, ef), []).extend(members)
        if path == "sparse":
            n_sparse += n
            workspace = max(workspace, 4 * n * b * d_sae)
    acts += STEP_OVERHEAD
    if len(stacks) > 1:
        acts += workspace  # the sparse path's pre-activation buffer stays allocated between steps
    acts_dense = STEP_OVERHEAD + max(
        len(m) * step_activation_bytes(arch, d_in, ef * d_in, max(s.k or 0 for s in m), b, "dense", 0)
        for (_, arch, ef), m in dense_stacks.items())
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
    return MemoryEstimate(state, acts, data, device, host, n_sparse, len(specs) - n_sparse, acts_dense)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def measure_peak_rss(fn: Callable[[], object]) -> int | None:
    """Bytes by which this process's peak resident memory rose above its resident memory at the
    start while ``fn`` ran: what a step really used, allocator overheads included. Linux only
    (the peak, VmHWM, is reset through /proc/self/clear_refs); None elsewhere. Run it in a fresh
    process after a warm-up, so imports and one-time allocations do not count."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse does not hide growth
    except (OSError, AttributeError):
        pass
    try:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    fn()
    return _status_bytes("VmHWM") - before
