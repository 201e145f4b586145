"""The mechanisms the paper compares daGPAM with: unnormalized, CoDA, NAP and differential attention.

None of their maps is a probability vector per row (diff's is a difference of two), so apart
from diff none can use the fused softmax kernel: they build their T x T weights explicitly,
in fp32. Same conventions as :mod:`gpam_fairseq.attention.functional`: masked keys get
exactly 0 (every bias entry at or below :data:`gpam_fairseq.attention.masks.MASKED_BIAS`
counts as masked), a query whose keys are all masked gets a zero output.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gpam_fairseq.attention.functional import Lambda, accumulation_dtype, attention_scores, masked_softmax
from gpam_fairseq.attention.fused import fused_attention, zero_rows
from gpam_fairseq.attention.masks import Mask, as_mask, unmasked_keys


def masked_scores(q: Tensor, k: Tensor, bias: Union[Mask, Tensor, None] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """(Q K^T / sqrt(d_h) + finite bias, in fp32 with masked entries 0; keep mask or None)."""
    bias = as_mask(bias).dense_bias(q, k)
    scores = attention_scores(q, k).to(accumulation_dtype(q))
    keep = unmasked_keys(bias)
    if keep is None:
        return scores, None
    scores = scores + bias.to(scores.dtype).masked_fill(~keep, 0.0)
    keep = keep.expand_as(scores)
    return scores.masked_fill(~keep, 0.0), keep


def weighted_values(weights: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """dropout(W) V, in the dtype of V (weights are fp32, as returned to fairseq)."""
    return F.dropout(weights, dropout_p, training=dropout_p > 0).to(v.dtype) @ v


def unnormalized_weights(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """W = Q K^T / sqrt(d_h), masked entries 0: the scores used as weights, no normalisation."""
    scores, _ = masked_scores(q, k, bias)
    return scores


def unnormalized_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, dropout_p: float = 0.0, need_weights: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """Unnormalised attention, O = (Q K^T / sqrt(d_h)) V over the unmasked keys.

    Our reading of the "NON" baseline the GPAM paper compares with (softmax dropped, no
    normalisation at all). Rows have no fixed sum and no range; masked keys weigh 0.
    """
    weights = unnormalized_weights(q, k, bias)
    return weighted_values(weights, v, dropout_p), weights if need_weights else None


# elements of the (N, Tq, Tk, d) buffer that torch.cdist's p=1 backward builds, per chunk
CDIST_CHUNK_ELEMENTS = 2**28


def l1_distances(q: Tensor, k: Tensor) -> Tensor:
    """||q_i - k_j||_1 for every pair: (N, Tq, d) x (N, Tk, d) -> (N, Tq, Tk).

    torch.cdist(p=1)'s backward materialises an N*Tq*Tk*d buffer. Past 2^31 elements its CUDA
    kernel reads out of bounds (an illegal memory access, seen on an H100 at 1x8 heads x
    3072x3072 x d_h=128), and below that the buffer is still the memory peak; chunking the
    queries bounds it (autograd runs each chunk's backward and frees its buffer in turn).
    """
    rows = max(1, CDIST_CHUNK_ELEMENTS // max(1, q.size(0) * k.size(1) * q.size(2)))
    if rows >= q.size(1):
        return torch.cdist(q, k, p=1.0)
    return torch.cat([torch.cdist(chunk, k, p=1.0) for chunk in q.split(rows, dim=1)], dim=1)


def coda_weights(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """M = tanh(E) * sigmoid(N), E = Q K^T / sqrt(d_h), N = -||q_i - k_j||_1 / sqrt(d_h).

    Entries lie in (-1/2, 1/2) (tanh in (-1, 1), sigmoid of a non-positive number in
    (0, 1/2]); masked entries are 0. In fp32.
    """
    e, keep = masked_scores(q, k, bias)
    acc = e.dtype
    lead = q.shape[:-2]
    l1 = l1_distances(
        q.to(acc).reshape(-1, q.size(-2), q.size(-1)), k.to(acc).reshape(-1, k.size(-2), k.size(-1))
    ).view(*lead, q.size(-2), k.size(-2))
    weights = torch.tanh(e) * torch.sigmoid(-l1 * q.size(-1) ** -0.5)
    return weights if keep is None else weights.masked_fill(~keep, 0.0)


def coda_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, dropout_p: float = 0.0, need_weights: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """Compositional de-attention (CoDA; Tay et al., NeurIPS 2019), O = M V with

        M = tanh(E) * sigmoid(N)      E_ij = q_i . k_j / sqrt(d_h)      N_ij = -||q_i - k_j||_1 / sqrt(d_h)

    tanh(E) decides to add (+), subtract (-) or ignore (0) a value, sigmoid(N) gates it by
    the (negative) L1 distance of query and key; rows are not normalised. The paper's
    scaling constants alpha (on E) and beta (on N) are 1 here, both maps get the usual
    1/sqrt(d_h), and N is not mean-centred (the paper's plain formula).
    """
    weights = coda_weights(q, k, bias)
    return weighted_values(weights, v, dropout_p), weights if need_weights else None


def nap_weights(
    q: Tensor, k: Tensor, gain: Lambda, shift: Lambda, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> Tensor:
    """W = gain * (S - mean_j S) / sqrt(var_j S + eps) + shift over the unmasked keys j.

    S = Q K^T / sqrt(d_h) (the 1/sqrt(d_h) cancels in the normalisation); mean and
    (population) variance run over each query's unmasked keys only; masked entries are 0.
    A row with a single key gets ``shift`` (its centred score is 0). In fp32.
    """
    scores, keep = masked_scores(q, k, bias)
    if keep is None:
        mean = scores.mean(-1, keepdim=True)
        centred = scores - mean
        var = centred.pow(2).mean(-1, keepdim=True)
    else:
        keep_f = keep.to(scores.dtype)
        count = keep_f.sum(-1, keepdim=True).clamp_min(1.0)
        mean = scores.sum(-1, keepdim=True) / count  # masked scores are already 0
        centred = (scores - mean) * keep_f
        var = centred.pow(2).sum(-1, keepdim=True) / count
    weights = gain * (centred * torch.rsqrt(var + eps)) + shift
    return weights if keep is None else weights.masked_fill(~keep, 0.0)


def nap_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gain: Lambda,
    shift: Lambda,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    eps: float = 1e-5,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Normalized attention pooling (NAP; Richter & Wattenhofer 2020, arXiv:2005.09561).

    The softmax is replaced by a normalisation of each query's scores over its keys,
    with a learned gain and shift per head (initialised 1 and 0), and the weighted values
    are summed: O = W V with W = gain * (S - mean S) / std S + shift (:func:`nap_weights`).
    Rows of W are not probabilities: their mean over the unmasked keys is ``shift`` and
    their standard deviation is |gain|. (The authors' block adds layer norms and a GELU
    after the pooling; those belong to their layer, not to the attention, and are not
    added here.)
    """
    weights = nap_weights(q, k, gain, shift, bias, eps)
    return weighted_values(weights, v, dropout_p), weights if need_weights else None


def diff_lambda_init(layer_index: int) -> float:
    """lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for the l-th layer (1-based) of a stack."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_index - 1))


def diff_lambda(lambda_q1: Tensor, lambda_k1: Tensor, lambda_q2: Tensor, lambda_k2: Tensor, lambda_init: float) -> Tensor:
    """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, in fp32."""
    acc = accumulation_dtype(lambda_q1)
    dot = lambda a, b: (a.to(acc) * b.to(acc)).sum()
    return torch.exp(dot(lambda_q1, lambda_k1)) - torch.exp(dot(lambda_q2, lambda_k2)) + lambda_init


def pair_values(v: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, H/2, T, 2d): the values of heads 2i and 2i+1 side by side."""
    b, h, t, d = v.shape
    return v.unflatten(1, (h // 2, 2)).transpose(2, 3).reshape(b, h // 2, t, 2 * d)


def unpair_heads(x: Tensor) -> Tensor:
    """(B, H/2, T, 2d) -> (B, H, T, d), the inverse of :func:`pair_values`."""
    b, h2, t, d2 = x.shape
    return x.unflatten(-1, (2, d2 // 2)).transpose(2, 3).reshape(b, 2 * h2, t, d2 // 2)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in fp32."""
    acc = accumulation_dtype(x)
    x = x.to(acc)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)


def diff_weights(q: Tensor, k: Tensor, lam: Lambda, bias: Optional[Tensor] = None) -> Tensor:
    """A_i = softmax(Q_2i K_2i^T / sqrt(d_h) + M) - lambda softmax(Q_2i+1 K_2i+1^T / sqrt(d_h) + M),
    one map per head pair: (B, H/2, Tq, Tk), fp32; rows sum to 1 - lambda."""
    p = masked_softmax(attention_scores(q, k, as_mask(bias).dense_bias(q, k))).unflatten(1, (q.size(1) // 2, 2))
    return p[:, :, 0] - lam * p[:, :, 1]


def diff_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Lambda,
    lambda_init: float,
    norm_weight: Tensor,
    bias: Union[Mask, Tensor, None] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    eps: float = 1e-5,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Differential attention (Ye et al. 2024, arXiv:2410.05258) on our (B, H, T, d) heads.

    The paper's layout, read on our heads: heads 2i and 2i+1 are the two query/key halves
    (Q1, K1), (Q2, K2) of differential head i, whose value has dimension 2d (the values of
    heads 2i and 2i+1 concatenated), so H heads make H/2 differential heads:

        A_i = softmax(Q1 K1^T / sqrt(d) + M) - lambda softmax(Q2 K2^T / sqrt(d) + M)
        O_i = (1 - lambda_init) RMSNorm(A_i [V_2i, V_2i+1])          (RMSNorm over 2d, affine)

    and O_i is split back into heads 2i, 2i+1, so the output projection sees exactly the
    paper's concatenation. Without weights both maps go through one fused kernel call.
    Returned weights are A_i (rows sum to 1 - lambda), given to both heads of the pair.
    Attention dropout drops the two maps independently (as for daGPAM).
    """
    mask = as_mask(bias)
    v_pairs = pair_values(v)  # (B, H/2, Tk, 2d)
    weights = None
    if need_weights:
        p = masked_softmax(attention_scores(q, k, mask.dense_bias(q, k))).unflatten(1, (q.size(1) // 2, 2))
        o_1 = weighted_values(p[:, :, 0], v_pairs, dropout_p)
        o_2 = weighted_values(p[:, :, 1], v_pairs, dropout_p)
        weights = (p[:, :, 0] - lam * p[:, :, 1]).repeat_interleave(2, dim=1)
    else:
        # heads 2i and 2i+1 both read the pair's 2d-dimensional value: one kernel call
        both = fused_attention(q, k, v_pairs.repeat_interleave(2, dim=1), mask.bias, dropout_p, causal=mask.causal)
        both = both.unflatten(1, (q.size(1) // 2, 2))
        o_1, o_2 = both[:, :, 0], both[:, :, 1]
    acc = accumulation_dtype(o_1)
    combined = zero_rows(o_1.to(acc) - lam * o_2.to(acc), mask.empty_rows)
    out = rms_norm(combined, norm_weight, eps) * (1.0 - lambda_init)
    return unpair_heads(out).to(v.dtype), weights
