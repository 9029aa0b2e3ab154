"""Sparse products for TopK-family training: cost O(nnz x d_model) instead of O(batch x d_sae x d_model).

Why: a TopK SAE keeps k of d_sae features per token, yet a dense step multiplies the whole
[batch, d_sae] feature matrix (mostly zeros) by the decoder in the forward pass and twice more in
the backward pass (decoder gradient, feature gradient), and the encoder's weight gradient is
another dense product with a gradient that is zero outside the kept entries. Only the encoder's
forward product has to be dense (it is what picks the top k). Here the kept entries are a sparse
matrix S (``SparsePattern``: for every row, its feature columns) and the four other products are:

- decode ``S @ W_dec`` and the decoder gradient ``S^T @ g``: ``embedding_bag`` sums over the
  kept rows of W_dec (per token) or of g (per feature, through the transposed pattern);
- the features' gradient ``(g @ W_dec^T)`` at the kept entries only: a sampled product (SDDMM);
- the encoder gradient ``S'^T @ x_in`` (S' holding the pre-activation gradient): an
  ``embedding_bag`` over the transposed pattern, and the gradient reaching b_dec through the
  input, ``-W_enc @ colsum(S')``, a matrix-vector product.

A stack of n SAEs is one block-diagonal pattern: rows ``i*batch + t``, columns ``i*d_sae + j``,
weights viewed as ``[n*d_sae, d_in]``; rows and columns never cross blocks, so every SAE gets
exactly the sums it would get alone (each output row or column is summed in the same order).
Only plain torch operators are used, so the same code runs on CPU and CUDA.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SAESpec


@dataclass
class SparsePattern:
    """Positions of the kept entries of an [n_rows, n_cols] matrix, rows ascending (columns within a
    row in a fixed order), plus the same entries grouped by column (the transpose) for the gradient sums."""

    n_rows: int
    n_cols: int
    col: torch.Tensor  # [nnz] int64
    offsets: torch.Tensor  # [n_rows + 1]: row r holds entries offsets[r]:offsets[r+1]
    t_perm: torch.Tensor  # [nnz]: entries in column order (stable: rows ascending within a column)
    t_row: torch.Tensor  # [nnz]: row of each entry, in column order
    t_offsets: torch.Tensor  # [n_cols + 1]

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @classmethod
    def build(cls, row: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int) -> SparsePattern:
        """From entries already grouped by row, rows ascending."""
        dev = col.device
        offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.bincount(row, minlength=n_rows).cumsum(0)
        t_perm = torch.argsort(col, stable=True)
        t_offsets = torch.zeros(n_cols + 1, dtype=torch.int64, device=dev)
        t_offsets[1:] = torch.bincount(col, minlength=n_cols).cumsum(0)
        return cls(n_rows, n_cols, col, offsets, t_perm, row[t_perm], t_offsets)


TOPK_GROUP = 16  # entries per group of ``top_k_last``'s first pass


def top_k_last(values: torch.Tensor, k: int, group: int = TOPK_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.topk(k, dim=-1)`` (largest first), faster on the wide rows of a CPU step.

    torch's CPU top-k copies each row into (value, index) pairs and partially sorts them: about 3 ns
    per entry, a fifth of a TopK step at d_sae 18,432. Here the m entries of a row are split into
    m / ``group`` strided groups (entries c, c + m/group, c + 2m/group, ...), whose maxima one
    vectorised pass takes (an elementwise max of ``group`` slices); the k largest entries of a row
    all lie in the k groups with the largest maxima (an entry outside them is below k group maxima,
    so below k entries of the row), so the exact top k is taken over those k x ``group`` candidates.
    Entries equal to the k-th may be chosen at other positions than torch's (torch leaves ties
    unordered too); the values are the same. Falls back to torch where the groups do not pay.
    """
    m = values.shape[-1]
    if values.is_cuda or m % group or k * group * 4 > m:
        return values.topk(min(k, m), dim=-1)
    lead, w = values.shape[:-1], m // group
    grouped = values.reshape(*lead, group, w)
    gtop = grouped.amax(-2).topk(k, dim=-1, sorted=False).indices  # [..., k]: groups holding the top k
    cand = grouped.gather(-1, gtop.unsqueeze(-2).expand(*lead, group, k)).reshape(*lead, group * k)
    top, pos = cand.topk(k, dim=-1)
    idx = (pos // k) * w + gtop.gather(-1, pos % k)
    return top, idx


def fixed_k_pattern(idx: torch.Tensor, n_cols: int) -> tuple[SparsePattern, torch.Tensor | None]:
    """Pattern of ``idx`` [n, b, K] (K columns of each row, column indices < n_cols per stack entry).

    Returns the pattern of the block-diagonal [n*b, n*n_cols] matrix and ``order`` [n, b, K], the
    permutation that sorts each row's columns (apply it to the values with ``gather``), or None
    when the columns keep the order of ``idx``: on CPU, where no kernel here needs sorted columns
    (``idx`` from a sorted top-k is already in a canonical order: by value), while cuSPARSE's
    sampled product expects sorted column indices.
    """
    n, b, k = idx.shape
    order = None
    if idx.is_cuda:
        idx, order = idx.sort(dim=-1)
    shift = (torch.arange(n, device=idx.device) * n_cols).view(n, 1, 1)
    col = (idx + shift).reshape(-1)
    row = torch.arange(n * b, device=idx.device).repeat_interleave(k)
    return SparsePattern.build(row, col, n * b, n * n_cols), order


def flat_pattern(flat_idx: torch.Tensor, b: int, n_cols: int) -> tuple[SparsePattern, torch.Tensor]:
    """Pattern of ``flat_idx`` [n, K]: indices into each stack entry's flattened [b, n_cols] matrix
    (BatchTopK keeps K entries anywhere in the batch, so rows hold different numbers of entries).

    Returns the pattern and ``order`` [n*K], the permutation of the flattened entries into pattern order.
    """
    n, _ = flat_idx.shape
    shift = (torch.arange(n, device=flat_idx.device) * (b * n_cols)).view(n, 1)
    gidx, order = (flat_idx + shift).reshape(-1).sort()  # unique keys: (entry, row, column) ascending
    row = gidx // n_cols  # = entry * b + token
    col = (gidx // (b * n_cols)) * n_cols + gidx % n_cols
    return SparsePattern.build(row, col, n * b, n * n_cols), order


def bag_sum(p: SparsePattern, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``S @ table``: [n_rows, d], row r = sum over its entries e of weights[e] * table[col[e]]."""
    return F.embedding_bag(p.col, table, p.offsets, mode="sum", per_sample_weights=weights,
                           include_last_offset=True)


def bag_sum_t(p: SparsePattern, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``S^T @ table``: [n_cols, d], column c = sum over its entries e of weights[e] * table[row[e]]."""
    return F.embedding_bag(p.t_row, table, p.t_offsets, mode="sum", per_sample_weights=weights[p.t_perm],
                           include_last_offset=True)


def sampled_dot(p: SparsePattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[nnz]: entry e = a[row(e)] . b[col(e)] (a [n_rows, d], b [n_cols, d]), without forming a @ b^T."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta": used here only for this product
        s = torch.sparse_csr_tensor(p.offsets, p.col, torch.zeros(p.nnz, dtype=a.dtype, device=a.device),
                                    size=(p.n_rows, p.n_cols))
        return torch.sparse.sampled_addmm(s, a, b.t(), beta=0.0).values()


class SparseDecode(torch.autograd.Function):
    """``S(values) @ table`` with the sparse backward: d values = g @ table^T at the kept entries,
    d table = S^T @ g. table is the stacked decoder viewed as [n*d_sae, d_in]."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, table: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
        ctx.save_for_backward(values, table)
        ctx.pattern = pattern
        return bag_sum(pattern, values, table)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        values, table = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        g = g.contiguous()
        grad_values = sampled_dot(p, g, table) if ctx.needs_input_grad[0] else None
        grad_table = bag_sum_t(p, values, g) if ctx.needs_input_grad[1] else None
        return grad_values, grad_table, None


class EncoderAtPattern(torch.autograd.Function):
    """The pre-activations ``x_in @ W_enc + b_enc`` at the kept entries, as a function of the encoder
    (and of b_dec through ``x_in = x - b_dec``) with a backward that touches only those entries.

    The values themselves come from the dense forward product (it is needed to choose the entries);
    this function only routes their gradient: d W_enc[:, c] = sum over entries of column c of
    g_e * x_in[row(e)], d b_enc[c] = sum g_e over column c, d b_dec = -W_enc @ d b_enc (the batch sum
    of the input gradient, without forming the [batch, d_in] gradient itself).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor | None, pattern: SparsePattern) -> torch.Tensor:
        ctx.save_for_backward(x_in, w_enc)
        ctx.pattern = pattern
        ctx.has_b_dec = b_dec is not None
        return values.view_as(values)  # no copy: only the gradient routing is new

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_in, w_enc = ctx.saved_tensors  # x_in [n*b, d_in], w_enc [n, d_in, d_sae]
        p: SparsePattern = ctx.pattern
        n, d_in, d_sae = w_enc.shape
        g = g.contiguous()
        grad_w = None
        if ctx.needs_input_grad[2]:
            # The sums come out as [d_sae, d_in] rows; the parameter is a contiguous [d_in, d_sae]. One
            # transposing copy into a fresh tensor, which autograd then takes as the gradient as it is
            # (a strided gradient would be copied by AccumulateGrad and by the optimiser instead).
            rows = bag_sum_t(p, g, x_in).view(n, d_sae, d_in)
            grad_w = torch.empty(n, d_in, d_sae, dtype=rows.dtype, device=rows.device)
            grad_w.copy_(rows.transpose(1, 2))
            del rows
        grad_b_enc = torch.zeros(p.n_cols, dtype=g.dtype, device=g.device).index_add_(0, p.col, g).view(n, d_sae)
        grad_b_dec = None
        if ctx.has_b_dec and ctx.needs_input_grad[4]:
            # One matrix-vector product per SAE: the same call whether the SAE is alone or in a stack.
            grad_b_dec = torch.stack([-torch.mv(w_enc[i], grad_b_enc[i]) for i in range(n)])
        return None, None, grad_w, grad_b_enc if ctx.needs_input_grad[3] else None, grad_b_dec, None


# ---------------------------------------------------------------------- which path a stack takes
SPARSE_ARCHITECTURES = ("topk", "batchtopk")
# "auto" takes the sparse path up to this density k / d_sae. The sparse products cost about 4 x
# nnz x d_in multiply-adds at several times lower throughput than a dense matmul, against 5 dense
# products of batch x d_sae x d_in saved: near the break-even here. Measured on the project's CPU
# (1 thread, d_sae 4,608, batch 4,096; bench/train.py --sections topk --ks 576,1152): sparse /
# dense step time 0.91 at k = 576 (1/8), 1.26 at k = 1,152 (1/4); with AuxK running, 0.70 and 0.98.
SPARSE_MAX_DENSITY = 1 / 8


def decoder_path_for(architecture: str, k_max: int, d_sae: int, setting: str) -> str:
    """"sparse" or "dense" for a stack of ``architecture`` SAEs whose largest k is ``k_max``.

    Standard and JumpReLU SAEs always train dense (their features are not top-k sparse by
    construction); ``setting`` ("auto", "sparse", "dense") is the run's ``decoder_path``.
    """
    if architecture not in SPARSE_ARCHITECTURES:
        return "dense"
    if setting != "auto":
        return setting
    return "sparse" if k_max <= SPARSE_MAX_DENSITY * d_sae else "dense"


def spec_decoder_path(spec: SAESpec, d_in: int, setting: str) -> str:
    """The path of one SAE of the grid, by its own k (stacks are formed per path: see trainer.group_key)."""
    return decoder_path_for(spec.architecture, spec.k or 0, spec.d_sae(d_in), setting)
