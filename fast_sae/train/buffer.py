"""The order in which training tokens reach the SAEs: FAST's mixing buffer, in-order, or random.

Why every order is a pure function of (seed, step): resuming must be bit-exact, and a producer
thread runs ahead of the trainer, so the state "where the buffer is" cannot be read off the
producer at checkpoint time. Instead the token indices served at any step can be recomputed from
the seed alone (the mixing buffer's index bookkeeping is replayed cycle by cycle, which is cheap:
integers only), and on resume the buffer's kept half is re-read by gathering those indices.
Randomness is drawn from ``numpy.random.default_rng([seed, order_tag, cycle])``, one generator per
refill cycle / epoch, so there is no RNG state that could drift.

Mixing buffer (docs/method.md §2): the buffer holds ``2H`` tokens. Cycle 0 fills it with the first
``2H`` tokens of the stream (cache order), shuffles, serves one half (``H`` tokens, as ``H/b``
batches) and keeps the other; each later cycle appends the next ``H`` stream tokens to the kept
half, shuffles the ``2H`` tokens, serves one half, keeps the other.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .loader import TokenStream

_MIXING, _RANDOM = 0, 1


@dataclass
class Block:
    """``n_steps`` consecutive batches, starting at ``first_step``: rows [i*b, (i+1)*b) are step first_step+i."""

    first_step: int
    n_steps: int
    acts: dict[int, torch.Tensor]  # layer -> float32 [n_steps * batch_size, d_model], normalised
    token_index: np.ndarray  # cache token index of every row


def mixing_half(buffer_tokens: int, batch_size: int) -> int:
    """Tokens served per refill: half the buffer, rounded down to whole batches (at least one)."""
    return max(batch_size, (buffer_tokens // 2) // batch_size * batch_size)


class BatchOrder:
    """Produces ``Block``s for steps [start_step, total_steps) in one of the three orders."""

    def __init__(self, order: str, stream: TokenStream, batch_size: int, buffer_tokens: int, seed: int,
                 block_tokens: int | None = None) -> None:
        self.order = order
        self.stream = stream
        self.b = batch_size
        self.seed = seed
        # A buffer larger than the training set would hold the same tokens twice: cap it at the data.
        self.half = min(mixing_half(buffer_tokens, batch_size), mixing_half(stream.n_train, batch_size))
        if block_tokens is None:
            # ~16 MiB per block: below glibc's mmap threshold, so block buffers are recycled from the
            # heap instead of being fresh (page-faulting) mappings each time.
            row_bytes = 4 * max(1, sum(r.cache.meta.d_model for r in stream.readers.values()))
            block_tokens = (16 << 20) // row_bytes
        self.block_steps = max(1, block_tokens // batch_size)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    # ------------------------------------------------------------------ mixing
    def _mixing_cycle_indices(self, cycle: int, kept: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
        """(buffer indices before shuffling, permutation, new-row stream position) of one refill."""
        h = self.half
        if cycle == 0:
            buf = self.stream.indices(0, 2 * h)
        else:
            buf = np.concatenate([kept, self.stream.indices((cycle + 1) * h, h)])
        perm = np.random.default_rng([self.seed, _MIXING, cycle]).permutation(2 * h)
        return buf, perm, (0 if cycle == 0 else (cycle + 1) * h)

    def kept_indices_before(self, cycle: int) -> np.ndarray | None:
        """Token indices in the kept half when ``cycle`` starts (replays the earlier cycles' bookkeeping)."""
        kept = None
        for c in range(cycle):
            buf, perm, _ = self._mixing_cycle_indices(c, kept)
            kept = buf[perm[self.half:]]
        return kept

    def _mixing(self, start_step: int, total_steps: int) -> Iterator[Block]:
        """Materialise the cycles. Rows live in a fixed store of 2H slots and are never moved: each
        cycle reads H fresh rows, scatters them into the slots freed by the last served half, and
        gathers the new served half out (3 row copies per token instead of 5 with concatenations).
        The logical buffer order (kept rows, then fresh rows) is what the permutation applies to,
        exactly as in ``_mixing_cycle_indices``."""
        h, steps_per_cycle = self.half, self.half // self.b
        cycle = start_step // steps_per_cycle
        kept_idx = self.kept_indices_before(cycle)
        store = {layer: np.empty((2 * h, r.cache.meta.d_model), np.float32) for layer, r in self.stream.readers.items()}
        kept_slots = np.arange(h)
        free_slots = np.arange(h, 2 * h)
        if kept_idx is not None:  # resuming mid-run: re-read the kept half by gathering its rows
            for layer, r in self.stream.readers.items():
                store[layer][:h] = r.gather(kept_idx)
        while cycle * steps_per_cycle < total_steps:
            buf_idx, perm, pos = self._mixing_cycle_indices(cycle, kept_idx)
            if cycle == 0:
                for layer, rows in self.stream.read(0, 2 * h).items():
                    store[layer][:] = rows
                slots = np.arange(2 * h)
            else:
                for layer, rows in self.stream.read(pos, h).items():
                    store[layer][free_slots] = rows
                slots = np.concatenate([kept_slots, free_slots])
            served_slots = slots[perm[:h]]
            kept_slots, free_slots = slots[perm[h:]], served_slots
            kept_idx = buf_idx[perm[h:]]
            first = cycle * steps_per_cycle
            skip = max(0, start_step - first)
            n = min(steps_per_cycle, total_steps - first) - skip
            use = served_slots[skip * self.b:(skip + n) * self.b]
            acts = {layer: torch.from_numpy(st[use]) for layer, st in store.items()}
            yield Block(first + skip, n, acts, buf_idx[perm[:h]][skip * self.b:(skip + n) * self.b])
            cycle += 1

    # ------------------------------------------------------------------ sequential / random
    def _random_indices(self, step: int) -> np.ndarray:
        per_epoch = self.stream.n_train // self.b
        if per_epoch == 0:
            raise ValueError(f"batch size {self.b} exceeds the {self.stream.n_train} training tokens")
        epoch, i = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, _RANDOM, epoch]).permutation(self.stream.n_train)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[i * self.b:(i + 1) * self.b]

    def _simple(self, start_step: int, total_steps: int) -> Iterator[Block]:
        step = start_step
        while step < total_steps:
            n = min(self.block_steps, total_steps - step)
            if self.order == "sequential":
                idx = self.stream.indices(step * self.b, n * self.b)
                acts = self.stream.read(step * self.b, n * self.b)
            else:
                idx = np.concatenate([self._random_indices(s) for s in range(step, step + n)])
                acts = {layer: r.gather(idx) for layer, r in self.stream.readers.items()}
            yield Block(step, n, {k: torch.from_numpy(v) for k, v in acts.items()}, idx)
            step += n

    def blocks(self, start_step: int, total_steps: int) -> Iterator[Block]:
        if self.order == "mixing":
            return self._mixing(start_step, total_steps)
        if self.order in ("sequential", "random"):
            return self._simple(start_step, total_steps)
        raise ValueError(f"unknown order {self.order!r}")

