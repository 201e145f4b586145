"""The attention calls the mechanisms make: the explicit reference path when weights are asked for, the fused path otherwise."""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gpam_fairseq.attention.functional import (
    Lambda, attention_scores, dagpam_probabilities, masked_softmax, physical_order, signed_sum,
)
from gpam_fairseq.attention.fused import _RecomputedAttention, fused_attention, fused_dagpam, zero_rows
from gpam_fairseq.attention.masks import Mask, as_mask


# ----------------------------------------------------------------------------- softmax


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Union[Mask, Tensor, None] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Conventional attention: returns (output, weights or None)."""
    mask = as_mask(bias)
    if not need_weights:
        out = fused_attention(q, k, v, mask.bias, dropout_p, causal=mask.causal)
        return zero_rows(out, mask.empty_rows, physical_order(q)), None
    probs = masked_softmax(attention_scores(q, k, mask.dense_bias(q, k)))
    out = F.dropout(probs, dropout_p, training=dropout_p > 0).to(v.dtype) @ v
    return out, probs


# ----------------------------------------------------------------------------- daGPAM


def dagpam_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_q_neg: Tensor,
    lambda_pos: Lambda,
    lambda_neg: Lambda,
    bias: Union[Mask, Tensor, None] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    recompute: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """daGPAM attention: returns (output, P_G or None). ``bias``: a :class:`Mask`, or an
    additive mask tensor. ``recompute``: keep only q, k, v for the backward pass and run the
    fused path again there (:class:`_RecomputedAttention`).

    Without weights the two maps are never built: both query sets go through **one** fused
    kernel call over the shared K and V (:func:`stack_queries`): on the head axis with
    grouped-query attention for the causal mask (``is_causal``, no mask tensor: the flash
    kernel's path), on the query axis otherwise. The signed combination is one more kernel
    (:class:`_SignedCombination`).

    With weights, both maps come from one product and one softmax
    (:func:`dagpam_probabilities`) and the output is one product with V: O = P_G V, or,
    under dropout, [(1 + lambda+) drop(P+) - lambda- drop(P-)] V with independent masks
    (one dropout call on the stacked maps), which equals the two-product form by linearity.
    """
    mask = as_mask(bias)
    if need_weights:
        probs = dagpam_probabilities(q, k, w_q_neg, mask.dense_bias(q, k))
        p_pos, p_neg = probs.unbind(-3)
        p_g = signed_sum(p_pos, p_neg, lambda_pos, lambda_neg)
        if dropout_p > 0:
            d_pos, d_neg = F.dropout(probs, dropout_p, training=True).unbind(-3)
            mixed = signed_sum(d_pos, d_neg, lambda_pos, lambda_neg)
        else:
            mixed = p_g
        return (mixed.to(v.dtype) @ v), p_g

    if recompute and torch.is_grad_enabled():
        out = _RecomputedAttention.apply(q, k, v, w_q_neg, lambda_pos, lambda_neg, mask, dropout_p)
    else:
        out = fused_dagpam(q, k, v, w_q_neg, lambda_pos, lambda_neg, mask, dropout_p)
    return out, None
