"""Packing sequences into forward batches without wasting compute on padding.

Consecutive sequences are packed into rows of at most ``row_tokens`` tokens; each packed sequence
restarts its position ids at 0 and attends only to itself (a block-diagonal causal mask), so its
activations equal those of the sequence run alone. Because rows are filled in stream order, a
batch covers one contiguous range of the token stream and its output is written in place without
any reordering. The plan is a pure function of the stream and the two sizes, so a resumed harvest
recomputes exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    start: int  # first token of the stream in this batch
    end: int  # one past the last
    rows: list[list[tuple[int, int]]]  # per row, the (start, end) stream ranges of its sequences

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


def plan_batches(seq_starts: np.ndarray, row_tokens: int, batch_tokens: int) -> list[Batch]:
    """Greedy, order-preserving packing.

    A row takes consecutive sequences while they fit in ``row_tokens`` (a longer sequence gets a
    row of its own); a batch takes rows while rows x longest row (its padded size) stays within
    ``batch_tokens``. Short rows keep the attention cost of packing low: a packed row computes
    attention over its whole length, so rows far longer than the sequences waste compute.
    """
    lengths = np.diff(seq_starts)
    rows: list[list[tuple[int, int]]] = []
    row: list[tuple[int, int]] = []
    row_len = 0
    for s, n in zip(seq_starts[:-1].tolist(), lengths.tolist()):
        if row and row_len + n > row_tokens:
            rows.append(row)
            row, row_len = [], 0
        row.append((s, s + n))
        row_len += n
    if row:
        rows.append(row)
    batches: list[Batch] = []
    current: list[list[tuple[int, int]]] = []
    longest = 0
    for r in rows:
        n = r[-1][1] - r[0][0]
        if current and (len(current) + 1) * max(longest, n) > batch_tokens:
            batches.append(Batch(current[0][0][0], current[-1][-1][1], current))
            current, longest = [], 0
        current.append(r)
        longest = max(longest, n)
    if current:
        batches.append(Batch(current[0][0][0], current[-1][-1][1], current))
    return batches


@dataclass
class BatchTensors:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, 1, T, T) bool, True = may attend; None = plain causal suffices
    valid: torch.Tensor  # (B, T) bool, real tokens in stream order when flattened


def batch_tensors(batch: Batch, token_ids: np.ndarray, pad_id: int) -> BatchTensors:
    T = max(r[-1][1] - r[0][0] for r in batch.rows)
    B = len(batch.rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(batch.rows):
        offset = 0
        for k, (s, e) in enumerate(row):
            n = e - s
            ids[b, offset:offset + n] = torch.from_numpy(token_ids[s:e].astype(np.int64))
            pos[b, offset:offset + n] = torch.arange(n)
            seg[b, offset:offset + n] = k
            offset += n
    valid = seg >= 0
    packed = any(len(row) > 1 for row in batch.rows)
    mask = None
    if packed:
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        mask = (seg[:, :, None] == seg[:, None, :]) & causal & valid[:, :, None]
        mask |= torch.eye(T, dtype=torch.bool)  # pad rows attend to themselves: no NaN, never stored
        mask = mask[:, None]
    return BatchTensors(ids, pos, mask, valid)
