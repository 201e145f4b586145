"""The attention math, as pure functions of tensors (no fairseq, no modules).

Read this file top to bottom to understand daGPAM (Heo & Choi, arXiv:2410.15578):

    Q- = ReLU(Q+) W_Q-                               W_Q- is d_h x d_h (shared or per head)
    P+ = softmax(Q+ K^T / sqrt(d_h) + M)             the usual attention map
    P- = softmax(Q- K^T / sqrt(d_h) + M)             a second map from the derived query
    P_G = (1 + lambda+) P+ - lambda- P-              rows sum to 1 + lambda+ - lambda-
    O  = P_G V = (1 + lambda+) (P+ V) - lambda- (P- V)

The last line is exact by linearity, so the output can be computed with two fused
``scaled_dot_product_attention`` calls (or one call on the stacked queries) without ever
materialising a T x T map. That is the path taken whenever no weights are requested;
the explicit path builds P_G and is used only when a caller asks for the weights.

Conventions shared by every function here:
    q: (B, H, Tq, d_h)   k: (B, H, Tk, d_h)   v: (B, H, Tk, d_v)
    bias: additive mask broadcastable to (B, H, Tq, Tk), ``-inf`` where a key is masked
    lambda_pos / lambda_neg: python floats, or fp32 tensors broadcastable to (B, H, 1, 1)

Masked keys get exactly zero weight. A query row whose keys are *all* masked gets a zero
output and zero weights in every path (a plain softmax would give NaN there).

Attention dropout: each probability map is dropped out on its own, with independent
masks, and the two results are combined. This is what two fused kernel calls do, and the
explicit path does the same, so both paths sample the same distribution; in expectation
the output is still P_G V. Returned weights are always the un-dropped P_G, as in fairseq.
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


def masked_softmax(scores: Tensor) -> Tensor:
    """softmax over keys in fp32; rows with no unmasked key give zeros instead of NaN."""
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    # finite scores in those rows first, so that neither the forward nor the backward
    # pass of the softmax ever sees a row of -inf
    scores = scores.masked_fill(fully_masked, 0.0)
    probs = torch.softmax(scores, dim=-1, dtype=accumulation_dtype(scores))
    return probs.masked_fill(fully_masked, 0.0)


def zero_fully_masked_rows(out: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Force a zero output for query rows whose keys are all masked.

    The fused kernels already return 0 there on the CPU, but not every backend promises
    it, so every fused path ends here (once, after combining) rather than trusting the kernel.
    """
    if bias is None:
        return out
    fully_masked = torch.isneginf(bias).all(dim=-1, keepdim=True)
    return out.masked_fill(fully_masked, 0.0)


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float
) -> Tensor:
    """softmax(q k^T / sqrt(d_h) + bias) v through the fused kernel, never a T x T map.

    Fused kernels accumulate the softmax in fp32 even for fp16/bf16 inputs. Callers
    pass the final output through :func:`zero_fully_masked_rows`.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def combine(o_pos: Tensor, o_neg: Tensor, lambda_pos: Lambda, lambda_neg: Lambda) -> Tensor:
    """(1 + lambda+) O+ - lambda- O-, computed in fp32 and returned in the dtype of O+."""
    acc = accumulation_dtype(o_pos)
    out = o_pos.to(acc) * (1.0 + lambda_pos) - o_neg.to(acc) * lambda_neg
    return out.to(o_pos.dtype)


# ----------------------------------------------------------------------------- softmax


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Conventional attention: returns (output, weights or None)."""
    if not need_weights:
        return zero_fully_masked_rows(fused_attention(q, k, v, bias, dropout_p), bias), None
    probs = masked_softmax(attention_scores(q, k, bias))
    out = F.dropout(probs, dropout_p, training=dropout_p > 0).to(v.dtype) @ v
    return out, probs


# ----------------------------------------------------------------------------- daGPAM


def negative_query(q: Tensor, w_q_neg: Tensor) -> Tensor:
    """Q- = ReLU(Q+) W_Q-. ``w_q_neg`` is (d_h, d_h), shared by all heads, or (H, d_h, d_h)."""
    return F.relu(q) @ w_q_neg.to(q.dtype)


def dagpam_weights(
    q: Tensor,
    k: Tensor,
    w_q_neg: Tensor,
    lambda_pos: Lambda,
    lambda_neg: Lambda,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The explicit maps, in fp32: (P_G, P+, P-)."""
    p_pos = masked_softmax(attention_scores(q, k, bias))
    p_neg = masked_softmax(attention_scores(negative_query(q, w_q_neg), k, bias))
    return (1.0 + lambda_pos) * p_pos - lambda_neg * p_neg, p_pos, p_neg


def dagpam_scores(q: Tensor, k: Tensor, w_q_neg: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The two score maps before their softmax, stacked on a new leading axis (+, -)."""
    q_neg = negative_query(q, w_q_neg)
    return torch.stack([attention_scores(q, k, bias), attention_scores(q_neg, k, bias)])


def dagpam_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_q_neg: Tensor,
    lambda_pos: Lambda,
    lambda_neg: Lambda,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """daGPAM attention: returns (output, P_G or None).

    Without weights the two maps are never built: both queries go through the fused
    kernel, stacked along the query axis into one call when the mask does not depend on
    the query (encoder self-attention, cross attention, incremental steps), in two calls
    otherwise (a causal mask would have to be copied for the stacked queries).
    """
    q_neg = negative_query(q, w_q_neg)
    if need_weights:
        p_g, p_pos, p_neg = dagpam_weights(q, k, w_q_neg, lambda_pos, lambda_neg, bias)
        train = dropout_p > 0
        o_pos = F.dropout(p_pos, dropout_p, training=train).to(v.dtype) @ v
        o_neg = F.dropout(p_neg, dropout_p, training=train).to(v.dtype) @ v
        return combine(o_pos, o_neg, lambda_pos, lambda_neg), p_g

    if bias is None or bias.size(-2) == 1:
        both = fused_attention(torch.cat([q, q_neg], dim=-2), k, v, bias, dropout_p)
        o_pos, o_neg = both.split(q.size(-2), dim=-2)
    else:
        o_pos = fused_attention(q, k, v, bias, dropout_p)
        o_neg = fused_attention(q_neg, k, v, bias, dropout_p)
    return zero_fully_masked_rows(combine(o_pos, o_neg, lambda_pos, lambda_neg), bias), None
