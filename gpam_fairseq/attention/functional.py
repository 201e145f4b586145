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
from collections import OrderedDict
from contextlib import contextmanager
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


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor, made once per value, dtype and device (an operand that costs no kernel)."""
    key = (value, dtype, device)
    if key not in _SCALARS:  # a fill on the device: no copy from the host, no synchronisation
        _SCALARS[key] = torch.full((), value, dtype=dtype, device=device)
    return _SCALARS[key]


_SCALARS: dict = {}


class _ZeroRows(torch.autograd.Function):
    """out with some query rows zeroed, written in a given memory order: one kernel that also
    does the copy the caller would make to merge the heads."""

    @staticmethod
    def forward(ctx, out, rows, order):
        result = torch.empty([out.size(i) for i in order], dtype=out.dtype, device=out.device)
        torch.where(rows.permute(order), scalar(0.0, out.dtype, out.device), out.permute(order), out=result)
        ctx.save_for_backward(rows)
        return result.permute(inverse_permutation(order))

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.masked_fill(rows, 0.0), None, None


def zero_rows(out: Tensor, rows: Optional[Tensor], order=None) -> Tensor:
    """``out`` with the given query rows set to zero (``rows`` None: nothing to do), laid out
    in ``order`` (a memory order of its dimensions) when given.

    The fused kernels of torch >= 2.5 already return 0 for a query whose keys are all masked
    (older ones and some backends return NaN), so every fused path ends here rather than
    trusting the kernel: one masked fill, on rows found once per mask (:class:`Mask`).
    """
    if rows is None:
        return out
    if order is None:
        return out.masked_fill(rows, 0.0)
    return _ZeroRows.apply(out, rows, order)


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


# ----------------------------------------------------------------------------- masks


class Mask:
    """What one attention call may see: an additive bias, or the causal mask.

    ``bias``: broadcastable to (B, H, Tq, Tk), ``-inf`` where a key is masked. ``causal``
    stands for the square causal mask *instead of* a bias tensor, so that the fused kernel
    takes its ``is_causal`` path (FlashAttention reads no mask at all there).

    The attention module builds one Mask per set of fairseq masks and hands the same object
    to every layer that receives them (:meth:`from_parts`), so everything derived from the
    masks is computed once per forward pass, not once per layer, and only if asked for: the
    bias, the bias for queries stacked on the query axis (built directly, not by copying the
    bias), and the query rows that see no key at all.
    """

    def __init__(self, bias: Optional[Tensor] = None, causal: bool = False):
        if causal and bias is not None:
            raise ValueError("Mask: give a bias or causal=True, not both (fold the causal mask into the bias)")
        self.causal = causal
        self._bias = bias
        self._parts: Optional[Tuple[Optional[Tensor], Optional[Tensor], torch.dtype]] = None
        self._pad_bias: Optional[Tensor] = None
        self._stacked: Optional[Tensor] = None
        self._empty_rows: Optional[Tensor] = None
        self._empty_rows_known = bias is None
        self._causal_bias = False

    @classmethod
    def from_parts(
        cls, attn_bias: Optional[Tensor], key_padding: Optional[Tensor], dtype: torch.dtype, causal_bias: bool = False
    ) -> "Mask":
        """The mask of an additive ``attn_bias`` (broadcastable to (1, 1, Tq, Tk)) and a boolean
        ``key_padding`` (B, Tk), True = pad; either may be None. ``causal_bias``: attn_bias is
        the square causal mask (then a row sees no key exactly when its prefix is all pads)."""
        mask = cls()
        mask._parts = (attn_bias, key_padding, dtype)
        mask._causal_bias = causal_bias
        mask._empty_rows_known = attn_bias is None and key_padding is None
        return mask

    def _padding_bias(self) -> Optional[Tensor]:
        _, key_padding, dtype = self._parts
        if key_padding is None:
            return None
        if self._pad_bias is None:
            device = key_padding.device
            pad = key_padding.view(key_padding.size(0), 1, 1, key_padding.size(1))
            self._pad_bias = torch.where(pad, scalar(float("-inf"), dtype, device), scalar(0.0, dtype, device))
        return self._pad_bias

    @property
    def bias(self) -> Optional[Tensor]:
        if self._bias is None and self._parts is not None:
            attn_bias, key_padding, _ = self._parts
            pad = self._padding_bias()
            self._bias = attn_bias if pad is None else pad if attn_bias is None else attn_bias + pad
        return self._bias

    @property
    def empty_rows(self) -> Optional[Tensor]:
        """True for query rows whose keys are all masked (broadcastable to (B, 1, Tq, 1)); None
        when no row can be: no bias, or the causal mask (its diagonal is always visible)."""
        if not self._empty_rows_known:
            parts = self._parts
            if parts is not None and parts[0] is None:  # padding only: a sequence of pads
                key_padding = parts[1]
                self._empty_rows = key_padding.all(-1).view(-1, 1, 1, 1)
            elif parts is not None and self._causal_bias and parts[1] is not None:  # a prefix of pads
                key_padding = parts[1]
                self._empty_rows = key_padding.cummin(-1).values.view(key_padding.size(0), 1, -1, 1)
            elif self._bias is None and self._stacked is not None:  # rows of Q+ are the first half
                self._empty_rows = all_keys_masked(self._stacked)[..., : self._stacked.size(-2) // 2, :]
            else:
                self._empty_rows = all_keys_masked(self.bias)
            self._empty_rows_known = True
        return self._empty_rows

    def stacked_bias(self) -> Optional[Tensor]:
        """The bias for two query sets laid end to end on the query axis (..., 2 Tq, Tk).

        A bias that does not depend on the query (padding: (B, 1, 1, Tk)) broadcasts as it is;
        one that does (causal + padding) is laid out twice, in the one addition that builds it."""
        if self._stacked is None:
            if self._parts is not None and self._bias is None:
                attn_bias, _, _ = self._parts
                pad = self._padding_bias()
                if attn_bias is None or attn_bias.size(-2) == 1:
                    self._stacked = self.bias
                else:
                    doubled = attn_bias.unsqueeze(-3).expand(*attn_bias.shape[:-2], 2, *attn_bias.shape[-2:])
                    self._stacked = doubled.reshape(*attn_bias.shape[:-2], -1, attn_bias.size(-1)) if pad is None else (
                        (doubled + pad.unsqueeze(-3)).flatten(-3, -2)
                    )
            else:
                bias = self.bias
                if bias is None or bias.size(-2) == 1:
                    self._stacked = bias
                else:
                    lead, (tq, tk) = bias.shape[:-2], bias.shape[-2:]
                    self._stacked = bias.unsqueeze(-3).expand(*lead, 2, tq, tk).reshape(*lead, 2 * tq, tk)
        return self._stacked

    def dense_bias(self, q: Tensor, k: Tensor) -> Optional[Tensor]:
        """The mask as one additive tensor, causal mask included (explicit paths, statistics)."""
        if not self.causal:
            return self.bias
        tq, tk = q.size(-2), k.size(-2)
        return torch.full((tq, tk), float("-inf"), dtype=q.dtype, device=q.device).triu(tk - tq + 1)


def as_mask(mask: Union[Mask, Tensor, None]) -> Mask:
    """A Mask from a Mask, an additive bias tensor or None."""
    return mask if isinstance(mask, Mask) else Mask(mask)


# ----------------------------------------------------------------------------- fused kernel

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)  # scaled_dot_product_attention(..., enable_gqa=True)


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, causal: bool = False, gqa: bool = False
) -> Tensor:
    """softmax(q k^T / sqrt(d_h) + bias) v through the fused kernel, never a T x T map.

    ``causal``: the square causal mask, with ``bias`` None. ``gqa``: q has G times the heads
    of k and v, query heads G h ... G h + G - 1 reading head h (no copy of K, V). Fused
    kernels accumulate the softmax in fp32 even for fp16/bf16 inputs.
    """
    extra = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=causal, **extra)


def can_share_kv_heads(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether a causal call with twice the query heads (GQA) reaches a fused kernel.

    The CPU's fused kernel takes it; on CUDA, FlashAttention (fp16/bf16) does, and the
    memory-efficient kernel only in recent releases: ask torch, and otherwise use the
    query-axis layout, which every fused kernel takes."""
    if not SDPA_HAS_GQA:
        return False
    if q.device.type != "cuda":
        return True
    from torch.backends import cuda as backends

    params = backends.SDPAParams(q, k, v, None, dropout_p, True, True)
    return backends.can_use_flash_attention(params) or backends.can_use_efficient_attention(params)


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


def negative_query(q: Tensor, w_q_neg: Tensor) -> Tensor:
    """Q- = ReLU(Q+) W_Q-. ``w_q_neg`` is (d_h, d_h), shared by all heads, or (H, d_h, d_h).

    A shared W_Q- multiplies q in its memory order (no copy of the permuted per-head view)."""
    w = w_q_neg.to(q.dtype)
    if w.dim() == 3:
        return F.relu(q) @ w
    order = physical_order(q)
    return (F.relu(q.permute(order)) @ w).permute(inverse_permutation(order))


class _QueryPair(torch.autograd.Function):
    """Q- = ReLU(Q+) W_Q- and both query sets stacked (:func:`stack_queries`), keeping for the
    backward pass only the stacked tensor, which the fused kernel keeps anyway (its input):
    ReLU(Q+) is recomputed from its first half instead of being saved (one kernel for a
    tensor of the size of Q)."""

    @staticmethod
    def forward(ctx, q, w, on_heads):
        both = stack_queries(q, negative_query(q, w), on_heads)
        ctx.on_heads = on_heads
        ctx.q_shape = q.shape
        ctx.save_for_backward(both, w)
        return both

    @staticmethod
    def backward(ctx, grad_both):
        both, w = ctx.saved_tensors
        q, _ = _unstack_queries(both, ctx.on_heads, ctx.q_shape)
        grad_pos, grad_neg = _unstack_queries(grad_both, ctx.on_heads, ctx.q_shape)
        w_ = w.to(q.dtype)
        if w.dim() == 2:  # in q's memory order, where the heads and positions flatten without a copy
            order = physical_order(q)
            q_, grad_neg_ = q.permute(order), grad_neg.permute(order)
            grad_relu = (grad_neg_ @ w_.t()).permute(inverse_permutation(order))
            grad_w = F.relu(q_).reshape(-1, w.size(0)).t() @ grad_neg_.reshape(-1, w.size(1))
        else:
            grad_relu = grad_neg @ w_.transpose(-1, -2)
            grad_w = (F.relu(q).transpose(-1, -2) @ grad_neg).sum(0)
        grad_q = grad_pos + torch.ops.aten.threshold_backward(grad_relu, q, 0)
        return grad_q, grad_w.to(w.dtype), None


def _unstack_queries(both: Tensor, on_heads: bool, q_shape) -> Tuple[Tensor, Tensor]:
    """The two (B, H, Tq, d) halves of a :func:`stack_queries` tensor (views)."""
    pairs = both.unflatten(1, (q_shape[1], 2)) if on_heads else both.unflatten(2, (2, q_shape[2]))
    return pairs.unbind(2)


def query_pair(q: Tensor, w_q_neg: Tensor, on_heads: bool) -> Tensor:
    """Q+ and Q- = ReLU(Q+) W_Q- in one stacked tensor (:func:`stack_queries`)."""
    return _QueryPair.apply(q, w_q_neg, on_heads)


def stack_queries(q: Tensor, q_neg: Tensor, on_heads: bool) -> Tensor:
    """Both query sets in one tensor, with one copy, for one fused call over the shared K, V.

    ``on_heads``: (B, 2H, Tq, d), heads 2h and 2h+1 holding head h's Q+ and Q- (each pair
    reads K, V head h through grouped-query attention; the causal path). Otherwise
    (B, H, 2 Tq, d), Q+ above Q- on the query axis (each query row attends on its own, so
    the mask broadcasts unchanged when it does not depend on the query). The copy is laid
    out in q's memory order, so that the stacked tensor, the kernel's output and its
    gradient are views of it and need no further copy.
    """
    order = physical_order(q)
    new = order.index(1) + 1 if on_heads else order.index(2)  # just inside H, or just outside T
    stacked = torch.stack([q.permute(order), q_neg.permute(order)], dim=new)
    labels = order[:new] + [4] + order[new:]  # 0 B, 1 H, 2 T, 3 d, 4 the pair axis
    pairs = stacked.permute([labels.index(d) for d in (0, 1, 4, 2, 3)])  # (B, H, 2, Tq, d)
    return pairs.flatten(1, 2) if on_heads else pairs.flatten(2, 3)


class _SignedCombination(torch.autograd.Function):
    """(1 + lambda+) O+ - lambda- O- from the stacked output, in fp32 arithmetic, one kernel.

    ``pair`` is the fused call's output viewed as (B, H, 2, Tq, d). With fixed lambdas the
    forward pass is one ``lerp`` (computed in fp32 for fp16/bf16 inputs, rounded once) and
    the backward pass one broadcast multiplication that writes the gradient of both halves
    (rows to zero included). Nothing is saved for the backward pass except, with trainable
    lambdas, ``pair`` itself, which the fused kernel keeps anyway (its output). The result is
    written in ``order`` (q's memory order), so that merging the heads afterwards is a view.
    """

    @staticmethod
    def forward(ctx, pair, alpha, beta, rows_to_zero, order, rebuildable=True):
        a, b = (t.permute(order) for t in pair.unbind(2))
        out = torch.empty(a.shape, dtype=a.dtype, device=a.device)  # contiguous in ``order``
        ctx.fixed = not (isinstance(alpha, Tensor) or isinstance(beta, Tensor))
        if ctx.fixed:
            total = alpha + beta  # the row sum of P_G, 1 + lambda+ - lambda-
            if total == 1.0:
                torch.lerp(a, b, beta, out=out)  # (1 - beta) a + beta b
            elif total != 0.0:
                torch.lerp(a, b, beta / total, out=out).mul_(total)
            else:
                torch.sub(a, b, out=out).mul_(alpha)
            saved = (None,)
        else:
            acc = accumulation_dtype(a)
            # per-head (1, H, 1, 1) or per-module (1, 1, 1, 1) coefficients, permuted like a
            heads = tuple(_as_head_tensor(x, acc, a.device) for x in (alpha, beta))
            alpha_, beta_ = (x.permute(order) for x in heads)
            torch.addcmul(a.to(acc) * alpha_, b.to(acc), beta_, out=out)
            saved = (pair,) + heads
            ctx.lambda_shapes = tuple(x.shape if isinstance(x, Tensor) else None for x in (alpha, beta))
        if rebuildable:  # the result can be rebuilt from ``pair`` (see recomputed_instead_of_saved)
            out.gpam_recompute = (pair.detach(), alpha, beta, rows_to_zero, order)
        out = out.permute(inverse_permutation(order))
        if rows_to_zero is not None:
            out.masked_fill_(rows_to_zero, 0.0)
        ctx.alpha, ctx.beta = alpha, beta
        ctx.save_for_backward(rows_to_zero, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows_to_zero, pair, *heads = ctx.saved_tensors
        acc = accumulation_dtype(grad)
        if ctx.fixed:
            coefficients = _pair_coefficients(ctx.alpha, ctx.beta, acc, grad.device, rows_to_zero)
        else:
            coefficients = torch.stack(heads, dim=2).to(acc)  # (1, H or 1, 2, 1, 1)
            if rows_to_zero is not None:
                coefficients = coefficients.masked_fill(rows_to_zero.unsqueeze(2), 0.0)
        grad_pair = torch.empty(grad.shape[:2] + (2,) + grad.shape[2:], dtype=grad.dtype, device=grad.device)
        torch.mul(grad.unsqueeze(2), coefficients, out=grad_pair)
        grad_alpha = grad_beta = None
        if not ctx.fixed:
            # d/d alpha = sum of grad * O+, d/d beta = sum of grad * O-, in one product
            if rows_to_zero is not None:
                grad = grad.masked_fill(rows_to_zero, 0.0)
            per_half = grad.unsqueeze(2).to(acc) * pair.to(acc)  # (B, H, 2, Tq, d)
            shape_alpha, shape_beta = ctx.lambda_shapes
            if ctx.needs_input_grad[1]:
                grad_alpha = _reduce_to(per_half[:, :, 0], shape_alpha)
            if ctx.needs_input_grad[2]:
                grad_beta = _reduce_to(per_half[:, :, 1], shape_beta)
        return grad_pair, grad_alpha, grad_beta, None, None, None


def _rebuild(recipe) -> Tensor:
    """The result of _SignedCombination.forward, from the same inputs, in the same layout."""
    pair, alpha, beta, rows_to_zero, order = recipe
    with torch.no_grad():
        alpha, beta = (x.detach() if isinstance(x, Tensor) else x for x in (alpha, beta))
        return _SignedCombination.forward(_NoContext(), pair, alpha, beta, rows_to_zero, order)


class _NoContext:
    def save_for_backward(self, *tensors):
        pass


@contextmanager
def recomputed_instead_of_saved():
    """Within: a tensor that autograd would save and that is (a view of) a daGPAM signed
    combination is not kept; its backward use rebuilds it (one ``lerp``) from the fused
    kernel's output, which is kept anyway.

    The attention module runs its output projection in here: the projection's weight
    gradient needs its input, the combination, and keeping it would cost a tensor of the
    size of the attention output per layer."""
    if not torch.is_grad_enabled():
        yield
        return
    # hooks do not nest (the innermost pair replaces the others): hand every other tensor
    # to the hooks that were active outside, as if this context were not there
    outer = _outer_saved_tensors_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (lambda t: t, lambda t: t)

    def pack(t: Tensor):
        base = t if t._base is None else t._base
        recipe = getattr(base, "gpam_recompute", None)
        if recipe is None or base.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            return (False, outer_pack(t))
        return (True, (recipe, tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset()))

    def unpack(packed):
        rebuild, payload = packed
        if not rebuild:
            return outer_unpack(payload)
        recipe, shape, stride, offset = payload
        rebuilt = _rebuild(recipe)
        base = rebuilt if rebuilt._base is None else rebuilt._base
        return base.as_strided(shape, stride, base.storage_offset() + offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _outer_saved_tensors_hooks():
    """The (pack, unpack) hooks active now, or None (a private torch function; None if absent)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _as_head_tensor(x: Lambda, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A lambda (float, or a tensor broadcastable to (B, H, 1, 1)) as a (1, H or 1, 1, 1) tensor."""
    if not isinstance(x, Tensor):
        return torch.full((1, 1, 1, 1), x, dtype=dtype, device=device)
    return x.reshape(1, -1, 1, 1)


def _reduce_to(x: Tensor, shape) -> Optional[Tensor]:
    """Sum x (B, H, Tq, d) down to a lambda's shape (per head or per module)."""
    if shape is None:  # this coefficient was a float
        return None
    like = (1,) * (x.dim() - len(shape)) + tuple(shape)
    dims = [i for i, n in enumerate(like) if n == 1 and x.size(i) != 1]
    return x.sum(dims, keepdim=True).view(shape)


def tensor_identity(t: Optional[Tensor]) -> Optional[tuple]:
    """What makes two tensors interchangeable as cache keys: the same memory, geometry, dtype
    and version (an in-place change makes another key); None for None."""
    if t is None:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


class KeptAliveCache:
    """A small LRU of values built on demand, keyed by :func:`tensor_identity` among others.

    Each entry keeps the tensors its key was made from alive, so that their addresses cannot
    be reused by other tensors while the entry exists."""

    def __init__(self, size: int):
        self.size = size
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, key: tuple, build, keep_alive: tuple = ()):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry[0]
        value = build()
        self.entries[key] = (value, keep_alive)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


_COEFFICIENTS = KeptAliveCache(16)


def _pair_coefficients(
    alpha: float, beta: float, dtype: torch.dtype, device: torch.device, rows_to_zero: Optional[Tensor]
) -> Tensor:
    """(alpha, beta) as a (1, 1, 2, 1, 1) tensor, zero on ``rows_to_zero`` ((B, 1, 2, Tq, 1)
    then). Made once per value, dtype, device and row mask: the layers of a stack share one
    row mask (their Mask), so this costs a kernel per forward pass, not per layer."""

    def build() -> Tensor:
        if rows_to_zero is None:
            # fills on the device: no copy from the host, no synchronisation
            coefficients = torch.full((1, 1, 2, 1, 1), beta, dtype=dtype, device=device)
            coefficients[:, :, :1].fill_(alpha)
            return coefficients
        return _pair_coefficients(alpha, beta, dtype, device, None).masked_fill(rows_to_zero.unsqueeze(2), 0.0)

    key = (alpha, beta, dtype, device, tensor_identity(rows_to_zero))
    return _COEFFICIENTS.get(key, build, keep_alive=(rows_to_zero,))


def signed_combination(
    pair: Tensor, lambda_pos: Lambda, lambda_neg: Lambda, rows_to_zero: Optional[Tensor] = None, order=None,
    rebuildable: bool = True,
) -> Tensor:
    """(1 + lambda+) pair[:, :, 0] - lambda- pair[:, :, 1], with ``rows_to_zero`` set to 0; see
    :class:`_SignedCombination`. ``order``: the memory order of the result (default: that
    of the first half). ``rebuildable``: the result carries what rebuilds it from ``pair``
    (:func:`recomputed_instead_of_saved`), which keeps ``pair`` alive as long as the result."""
    order = physical_order(pair[:, :, 0]) if order is None else order
    return _SignedCombination.apply(pair, 1.0 + lambda_pos, -lambda_neg, rows_to_zero, order, rebuildable)


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


def fused_dagpam(
    q: Tensor, k: Tensor, v: Tensor, w_q_neg: Tensor, lambda_pos: Lambda, lambda_neg: Lambda, mask: Mask,
    dropout_p: float, rebuildable: bool = True,
) -> Tensor:
    """The fused path of :func:`dagpam_attention`: both query sets in one kernel call, then
    the signed combination (rebuildable: see :func:`recomputed_instead_of_saved`)."""
    # fairseq's future mask without padding: no mask tensor, is_causal (FlashAttention's path);
    # heads 2h, 2h+1 hold Q+, Q- of head h, and grouped-query attention reads K, V head h for both
    if mask.causal and can_share_kv_heads(q, k, v, dropout_p):
        both = fused_attention(query_pair(q, w_q_neg, on_heads=True), k, v, None, dropout_p, causal=True, gqa=True)
        pair = both.unflatten(1, (q.size(1), 2))
    # otherwise Q+ above Q- on the query axis: a mask that does not depend on the query
    # broadcasts (a causal mask, where no fused kernel takes grouped-query heads, is a tensor)
    else:
        bias = Mask(mask.dense_bias(q, k)).stacked_bias() if mask.causal else mask.stacked_bias()
        both = fused_attention(query_pair(q, w_q_neg, on_heads=False), k, v, bias, dropout_p)
        pair = both.unflatten(2, (2, q.size(2)))
    return signed_combination(pair, lambda_pos, lambda_neg, mask.empty_rows, physical_order(q), rebuildable)


class _RecomputedAttention(torch.autograd.Function):
    """:func:`fused_dagpam` keeping nothing for the backward pass but its inputs (q, k, v are
    kept by their projections' buffers anyway): the backward pass runs it again, with the
    forward pass's random state (the same dropout masks), and differentiates that. Saves the
    stacked queries, the two outputs and their log-sum-exps per layer for one more fused
    forward call (``--gpam-recompute-attention``)."""

    @staticmethod
    def forward(ctx, q, k, v, w, lambda_pos, lambda_neg, mask, dropout_p):
        ctx.rng = rng_state(q.device) if dropout_p > 0 else None
        ctx.mask, ctx.dropout_p = mask, dropout_p
        ctx.floats = tuple(None if isinstance(x, Tensor) else x for x in (lambda_pos, lambda_neg))
        ctx.save_for_backward(q, k, v, w, *(x for x in (lambda_pos, lambda_neg) if isinstance(x, Tensor)))
        return fused_dagpam(q, k, v, w, lambda_pos, lambda_neg, mask, dropout_p, rebuildable=False)

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        q, k, v, w = saved[:4]
        tensors = iter(saved[4:])
        lambdas = [next(tensors) if f is None else f for f in ctx.floats]
        needs = ctx.needs_input_grad[:6]
        with torch.enable_grad(), restored_rng(q.device, ctx.rng):
            inputs = [t.detach().requires_grad_(n) if isinstance(t, Tensor) else t
                      for t, n in zip([q, k, v, w, *lambdas], needs)]
            out = fused_dagpam(*inputs[:6], ctx.mask, ctx.dropout_p, rebuildable=False)
            wanted = [t for t, n in zip(inputs, needs) if n and isinstance(t, Tensor)]
            grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if n and isinstance(t, Tensor) else None for t, n in zip(inputs, needs)), None, None)


def rng_state(device: torch.device):
    """The random state that dropout on ``device`` draws from (a host copy: no device sync)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextmanager
def restored_rng(device: torch.device, state):
    """Draw again from ``state`` inside (the same dropout masks); the random state outside is
    left as it was."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


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
