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

import math
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


def none_masked_on_cpu(fully_masked: Tensor) -> bool:
    """True when ``fully_masked`` is a CPU tensor without any True: the fill can be skipped.

    On the CPU a host-side check costs nothing and saves passes over the output (or the
    T x T map) and their gradients. On accelerators the answer is always False, so the fill
    stays unconditional there: no host synchronisation on the hot path (CUDA graphs).
    """
    return fully_masked.device.type == "cpu" and not bool(fully_masked.any())


def masked_softmax(scores: Tensor) -> Tensor:
    """softmax over keys in fp32; rows with no unmasked key give zeros instead of NaN."""
    fully_masked = all_keys_masked(scores)
    if none_masked_on_cpu(fully_masked):
        return torch.softmax(scores, dim=-1, dtype=accumulation_dtype(scores))
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
    fully_masked = all_keys_masked(bias)
    if none_masked_on_cpu(fully_masked):
        return out
    return out.masked_fill(fully_masked, 0.0)


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float
) -> Tensor:
    """softmax(q k^T / sqrt(d_h) + bias) v through the fused kernel, never a T x T map.

    Fused kernels accumulate the softmax in fp32 even for fp16/bf16 inputs. Callers
    pass the final output through :func:`zero_fully_masked_rows`.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def signed_sum(pos: Tensor, neg: Tensor, lambda_pos: Lambda, lambda_neg: Lambda) -> Tensor:
    """(1 + lambda+) pos - lambda- neg in two kernels (a scale, then a fused multiply-subtract)."""
    scaled = pos * (1.0 + lambda_pos)
    if isinstance(lambda_neg, Tensor):
        return torch.addcmul(scaled, neg, lambda_neg, value=-1.0)
    return scaled.sub_(neg, alpha=lambda_neg)  # in place on a fresh tensor: autograd-safe


def combine(o_pos: Tensor, o_neg: Tensor, lambda_pos: Lambda, lambda_neg: Lambda) -> Tensor:
    """(1 + lambda+) O+ - lambda- O-, computed in fp32 and returned in the dtype of O+."""
    acc = accumulation_dtype(o_pos)
    return signed_sum(o_pos.to(acc), o_neg.to(acc), lambda_pos, lambda_neg).to(o_pos.dtype)


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

    With weights, both maps come from one product and one softmax
    (:func:`dagpam_probabilities`) and the output is one product with V: O = P_G V, or,
    under dropout, [(1 + lambda+) drop(P+) - lambda- drop(P-)] V with independent masks
    (one dropout call on the stacked maps), which equals the two-product form by linearity.
    """
    if need_weights:
        probs = dagpam_probabilities(q, k, w_q_neg, bias)
        p_pos, p_neg = probs.unbind(-3)
        p_g = signed_sum(p_pos, p_neg, lambda_pos, lambda_neg)
        if dropout_p > 0:
            d_pos, d_neg = F.dropout(probs, dropout_p, training=True).unbind(-3)
            mixed = signed_sum(d_pos, d_neg, lambda_pos, lambda_neg)
        else:
            mixed = p_g
        return (mixed.to(v.dtype) @ v), p_g

    q_neg = negative_query(q, w_q_neg)
    if bias is None or bias.size(-2) == 1:
        both = fused_attention(torch.cat([q, q_neg], dim=-2), k, v, bias, dropout_p)
        o_pos, o_neg = both.split(q.size(-2), dim=-2)
    else:
        o_pos = fused_attention(q, k, v, bias, dropout_p)
        o_neg = fused_attention(q_neg, k, v, bias, dropout_p)
    return zero_fully_masked_rows(combine(o_pos, o_neg, lambda_pos, lambda_neg), bias), None


# ----------------------------------------------------------------------------- alternatives
#
# The mechanisms the paper compares daGPAM with. None of their maps is a probability
# vector per row (diff's is a difference of two), so apart from diff none can use the fused
# softmax kernel: they build their T x T weights explicitly, in fp32. Same conventions as
# above: masked keys get exactly 0, a query whose keys are all masked gets a zero output.

# fairseq masks with -inf (padding, future), and the encoder's optional attn_mask with
# -1e8 (fp32) / -1e4 (fp16). Without a softmax, a "very negative" score is not a zero
# weight, so every bias entry at or below this value counts as a masked key.
MASKED_BIAS = -1e4


def unmasked_keys(bias: Optional[Tensor]) -> Optional[Tensor]:
    """True where a key may be attended (broadcastable to the scores); None: every key."""
    return None if bias is None else bias > MASKED_BIAS


def masked_scores(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """(Q K^T / sqrt(d_h) + finite bias, in fp32 with masked entries 0; keep mask or None)."""
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
    p = masked_softmax(attention_scores(q, k, bias)).unflatten(1, (q.size(1) // 2, 2))
    return p[:, :, 0] - lam * p[:, :, 1]


def diff_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Lambda,
    lambda_init: float,
    norm_weight: Tensor,
    bias: Optional[Tensor] = None,
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
    v_pairs = pair_values(v)  # (B, H/2, Tk, 2d)
    weights = None
    if need_weights:
        p = masked_softmax(attention_scores(q, k, bias)).unflatten(1, (q.size(1) // 2, 2))
        o_1 = weighted_values(p[:, :, 0], v_pairs, dropout_p)
        o_2 = weighted_values(p[:, :, 1], v_pairs, dropout_p)
        weights = (p[:, :, 0] - lam * p[:, :, 1]).repeat_interleave(2, dim=1)
    else:
        # heads 2i and 2i+1 both read the pair's 2d-dimensional value: one kernel call
        both = fused_attention(q, k, v_pairs.repeat_interleave(2, dim=1), bias, dropout_p)
        both = both.unflatten(1, (q.size(1) // 2, 2))
        o_1, o_2 = both[:, :, 0], both[:, :, 1]
    acc = accumulation_dtype(o_1)
    combined = zero_fully_masked_rows(o_1.to(acc) - lam * o_2.to(acc), bias)
    out = rms_norm(combined, norm_weight, eps) * (1.0 - lambda_init)
    return unpair_heads(out).to(v.dtype), weights
