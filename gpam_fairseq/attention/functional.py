"""The reference math of daGPAM: its formula as pure functions of tensors (no fairseq, no modules).

Read this file top to bottom to understand daGPAM (Heo & Choi, arXiv:2410.15578):

    Q- = ReLU(Q+) W_Q-                               W_Q- is d_h x d_h (shared or per head)
    P+ = softmax(Q+ K^T / sqrt(d_h) + M)             the usual attention map
    P- = softmax(Q- K^T / sqrt(d_h) + M)             a second map from the derived query
    P_G = (1 + lambda+) P+ - lambda- P-              rows sum to 1 + lambda+ - lambda-
    O  = P_G V = (1 + lambda+) (P+ V) - lambda- (P- V)

The functions here build the maps explicitly: they are the reference that every other path is
tested against. The last line is exact by linearity, so the output can be computed with
fused ``scaled_dot_product_attention`` calls (one call on the stacked queries) without ever
materialising a T x T map: that fast path is :mod:`gpam_fairseq.attention.fused`, taken
whenever no weights are requested; :mod:`gpam_fairseq.attention.paths` chooses between the two
(``dagpam_attention``). Masks are :mod:`gpam_fairseq.attention.masks`, the mechanisms the paper
compares daGPAM with :mod:`gpam_fairseq.attention.alternatives`.

Conventions shared by every function of the attention package:
    q: (B, H, Tq, d_h)   k: (B, H, Tk, d_h)   v: (B, H, Tk, d_v)
    bias: additive mask broadcastable to (B, H, Tq, Tk), ``-inf`` where a key is masked
    lambda_pos / lambda_neg: python floats, or fp32 tensors broadcastable to (B, H, 1, 1)

Masked keys get exactly zero weight. A query row whose keys are *all* masked gets a zero
output and zero weights in every path (a plain softmax would give NaN there).

Attention dropout: each probability map is dropped out on its own, with independent
masks, and the two results are combined. The fused path does this in its one kernel call over
the stacked queries and the explicit path does the same, so both paths sample the same
distribution; in expectation the output is still P_G V. Returned weights are always the un-dropped P_G, as in fairseq.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Lambda = Union[float, Tensor]


# ----------------------------------------------------------------------------- helpers


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 tensors, fp64 for fp64 ones (float64 tests stay exact)."""
    return torch.promote_types(t.dtype, torch.float32)


def attention_scores(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Q K^T / sqrt(d_h) + M, in the dtype of q (fairseq scales q before the product)."""
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    return scores


def all_keys_masked(scores_or_bias: Tensor) -> Tensor:
    """True for rows whose entries are all -inf: one max-reduction (no full boolean map)."""
    return scores_or_bias.detach().amax(dim=-1, keepdim=True) == float("-inf")


def masked_softmax(scores: Tensor) -> Tensor:
    """softmax over keys in fp32; rows with no unmasked key give zeros instead of NaN."""
    fully_masked = all_keys_masked(scores)
    # finite scores in those rows first, so that neither the forward nor the backward
    # pass of the softmax ever sees a row of -inf
    scores = scores.masked_fill(fully_masked, 0.0)
    probs = torch.softmax(scores, dim=-1, dtype=accumulation_dtype(scores))
    return probs.masked_fill(fully_masked, 0.0)


def physical_order(x: Tensor) -> list:
    """x's dimensions from the outermost to the innermost in memory.

    Per-head tensors are usually views: fairseq projects (T, B, H*d_h) and the heads are a
    permutation of that. Working in memory order avoids the copies that a matmul or an
    elementwise op on the permuted view would make.
    """
    return sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))


def inverse_permutation(order) -> list:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


# ----------------------------------------------------------------------------- daGPAM


def negative_query(q: Tensor, w_q_neg: Tensor) -> Tensor:
    """Q- = ReLU(Q+) W_Q-. ``w_q_neg`` is (d_h, d_h), shared by all heads, or (H, d_h, d_h).

    A shared W_Q- multiplies q in its memory order (no copy of the permuted per-head view);
    TorchScript, which cannot sort by a key, takes the plain product (the same numbers)."""
    w = w_q_neg.to(q.dtype)
    if w.dim() == 3 or torch.jit.is_scripting():
        return F.relu(q) @ w
    order = physical_order(q)
    return (F.relu(q.permute(order)) @ w).permute(inverse_permutation(order))


def signed_sum(pos: Tensor, neg: Tensor, lambda_pos: Lambda, lambda_neg: Lambda) -> Tensor:
    """(1 + lambda+) pos - lambda- neg in two kernels (a scale, then a fused multiply-subtract);
    the explicit path's combination of the two fp32 maps."""
    scaled = pos * (1.0 + lambda_pos)
    if isinstance(lambda_neg, Tensor):
        return torch.addcmul(scaled, neg, lambda_neg, value=-1.0)
    return scaled.sub_(neg, alpha=lambda_neg)  # in place on a fresh tensor: autograd-safe


def dagpam_probabilities(
    q: Tensor, k: Tensor, w_q_neg: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """P+ and P-, in fp32, stacked on axis -3: (..., 2, Tq, Tk).

    One score product and one softmax serve both maps: the two query sets are laid end to
    end on the query axis (a copy of Q only, K is read once), and the product is viewed as
    (..., 2, Tq, Tk) so that the mask broadcasts over the new axis without being copied.
    """
    q_both = torch.cat([q, negative_query(q, w_q_neg)], dim=-2)
    scores = attention_scores(q_both, k).unflatten(-2, (2, q.size(-2)))
    if bias is not None:
        scores = scores + bias.unsqueeze(-3)
    return masked_softmax(scores)


def dagpam_weights(
    q: Tensor,
    k: Tensor,
    w_q_neg: Tensor,
    lambda_pos: Lambda,
    lambda_neg: Lambda,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The explicit maps, in fp32: (P_G, P+, P-)."""
    p_pos, p_neg = dagpam_probabilities(q, k, w_q_neg, bias).unbind(-3)
    return signed_sum(p_pos, p_neg, lambda_pos, lambda_neg), p_pos, p_neg


def dagpam_scores(q: Tensor, k: Tensor, w_q_neg: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The two score maps before their softmax, stacked on a new leading axis (+, -)."""
    q_neg = negative_query(q, w_q_neg)
    return torch.stack([attention_scores(q, k, bias), attention_scores(q_neg, k, bias)])
