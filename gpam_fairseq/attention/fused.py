"""The fast path of daGPAM: both query sets in one fused kernel call, custom autograd, recompute, caches.

:func:`fused_dagpam` computes what :func:`gpam_fairseq.attention.functional.dagpam_weights`
defines, O = (1 + lambda+) (P+ V) - lambda- (P- V), without a T x T map: the two query sets
are stacked (:func:`stack_queries`) for one ``scaled_dot_product_attention`` call over the
shared K and V, and the signed combination is one more kernel (:class:`_SignedCombination`).
Custom autograd Functions keep for the backward pass only what the kernel keeps anyway;
under :func:`recomputed_instead_of_saved`, the stacked queries of self-attention
(:class:`StackedQueries`) and the combination are rebuilt in the backward pass instead of kept,
so that a daGPAM layer keeps what a stock one keeps but the second map's output and
log-sum-exp; :class:`_RecomputedAttention` (``--gpam-recompute-attention``) keeps only q, k, v. Every function here is tested against the reference math of
:mod:`gpam_fairseq.attention.functional` (tests/test_fast_paths.py).
"""

from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpam_fairseq.attention.functional import (
    Lambda, accumulation_dtype, inverse_permutation, negative_query, physical_order,
)
from gpam_fairseq.attention.masks import Mask, scalar


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


# ----------------------------------------------------------------------------- daGPAM


class _QueryPair(torch.autograd.Function):
    """Q- = ReLU(Q+) W_Q- and both query sets stacked (:func:`stack_queries`).

    Kept for the backward pass: with ``rebuilt`` (:class:`StackedQueries`), q and W_Q- (q is a
    view of the projection that the fused kernel keeps anyway for K and V), and ReLU(Q+) comes
    from the rebuild of the stacked tensor for the kernel's backward pass; otherwise the
    stacked tensor, which the fused kernel keeps anyway (its input), q read back from its first
    half and ReLU(Q+) recomputed (one kernel of the size of q)."""

    @staticmethod
    def forward(ctx, q, w, on_heads, rebuilt=None):
        both = stack_queries(q, negative_query(q, w), on_heads)
        ctx.on_heads = on_heads
        ctx.q_shape = q.shape
        ctx.rebuilt = rebuilt
        ctx.save_for_backward(q if rebuilt is not None else both, w)
        return both

    @staticmethod
    def backward(ctx, grad_both):
        kept, w = ctx.saved_tensors
        q = kept if ctx.rebuilt is not None else _unstack_queries(kept, ctx.on_heads, ctx.q_shape)[0]
        grad_pos, grad_neg = _unstack_queries(grad_both, ctx.on_heads, ctx.q_shape)
        relu = ctx.rebuilt.take_relu() if ctx.rebuilt is not None else None
        w_ = w.to(q.dtype)
        if w.dim() == 2:  # in q's memory order, where the heads and positions flatten without a copy
            order = physical_order(q)
            relu_ = F.relu(q.permute(order)) if relu is None else relu
            grad_neg_ = grad_neg.permute(order)
            grad_relu = (grad_neg_ @ w_.t()).permute(inverse_permutation(order))
            grad_w = relu_.reshape(-1, w.size(0)).t() @ grad_neg_.reshape(-1, w.size(1))
        else:
            grad_relu = grad_neg @ w_.transpose(-1, -2)
            grad_w = ((F.relu(q) if relu is None else relu).transpose(-1, -2) @ grad_neg).sum(0)
        grad_q = grad_pos + torch.ops.aten.threshold_backward(grad_relu, q, 0)
        return grad_q, grad_w.to(w.dtype), None, None


class StackedQueries:
    """How the stacked queries of one call are rebuilt instead of kept (see :func:`query_pair`).

    The fused kernel keeps its query input for its backward pass; daGPAM's is the stacked
    tensor [Q+, Q-], twice the size of q, half of it a copy of q. Under
    :func:`recomputed_instead_of_saved` it is not kept: the backward pass rebuilds it from q
    (kept anyway) and W_Q- with the forward pass's kernels (ReLU, one d_h x d_h product, the
    stacking copy), bit for bit, and hands its ReLU(Q+) on to the query pair's backward."""

    def __init__(self, q: Tensor, w: Tensor, on_heads: bool):
        self.q, self.w, self.on_heads = q, w, on_heads
        self.relu: Optional[Tensor] = None

    def kept(self) -> Tuple[Tensor, ...]:
        return (self.q,)

    def rebuild(self, kept) -> Tensor:
        (q,) = kept
        with torch.no_grad():
            w = self.w.to(q.dtype)
            if w.dim() == 3:
                self.relu = F.relu(q)
                q_neg = self.relu @ w
            else:
                order = physical_order(q)
                self.relu = F.relu(q.permute(order))
                q_neg = (self.relu @ w).permute(inverse_permutation(order))
            return stack_queries(q, q_neg, self.on_heads)

    def take_relu(self) -> Optional[Tensor]:
        relu, self.relu = self.relu, None
        return relu


def _unstack_queries(both: Tensor, on_heads: bool, q_shape) -> Tuple[Tensor, Tensor]:
    """The two (B, H, Tq, d) halves of a :func:`stack_queries` tensor (views)."""
    pairs = both.unflatten(1, (q_shape[1], 2)) if on_heads else both.unflatten(2, (2, q_shape[2]))
    return pairs.unbind(2)


def query_pair(q: Tensor, w_q_neg: Tensor, on_heads: bool, rebuildable: bool = False) -> Tensor:
    """Q+ and Q- = ReLU(Q+) W_Q- in one stacked tensor (:func:`stack_queries`).

    ``rebuildable``: the result carries what rebuilds it from q and W_Q- (:class:`StackedQueries`),
    so that a fused call made under :func:`recomputed_instead_of_saved` does not keep it."""
    if not (rebuildable and torch.is_grad_enabled() and (q.requires_grad or w_q_neg.requires_grad)):
        return _QueryPair.apply(q, w_q_neg, on_heads, None)
    recipe = StackedQueries(q.detach(), w_q_neg.detach(), on_heads)
    both = _QueryPair.apply(q, w_q_neg, on_heads, recipe)
    for t in (both, both._base):  # the kernel may save a view of it
        if t is not None:
            t.gpam_rebuild = recipe
    return both


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
            out.gpam_rebuild = _Combination(pair.detach(), alpha, beta, rows_to_zero, order)
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
        return _SignedCombination.forward(_NoContext(), pair, alpha, beta, rows_to_zero, order, rebuildable=False)


class _NoContext:
    def save_for_backward(self, *tensors):
        pass


class _Combination:
    """How a signed combination is rebuilt instead of kept: one ``lerp`` from the fused
    kernel's output, which is kept anyway."""

    def __init__(self, pair, alpha, beta, rows_to_zero, order):
        self.pair, self.rest = pair, (alpha, beta, rows_to_zero, order)

    def kept(self) -> Tuple[Tensor, ...]:
        return (self.pair,)

    def rebuild(self, kept) -> Tensor:
        return _rebuild((kept[0],) + self.rest)


def _recipe(t: Tensor):
    """What rebuilds ``t`` (or the tensor it is a view of), if anything: its ``gpam_rebuild``."""
    recipe = getattr(t, "gpam_rebuild", None)
    if recipe is None and t._base is not None:
        recipe = getattr(t._base, "gpam_rebuild", None)
    return recipe


@contextmanager
def recomputed_instead_of_saved():
    """Within: a tensor that autograd would save and that carries a recipe (``gpam_rebuild``:
    the stacked queries of :func:`query_pair`, a daGPAM signed combination) is not kept; the
    recipe's inputs are kept instead (tensors kept anyway), and its backward use rebuilds it.

    The fused daGPAM call runs in here (the kernel keeps its query input, the stacked queries),
    and so does the attention module's output projection when the combination is rebuildable."""
    if not torch.is_grad_enabled():
        yield
        return
    # hooks do not nest (the innermost pair replaces the others): hand every other tensor, and
    # the inputs of a recipe, to the hooks that were active outside, as if this were not there
    outer = _outer_saved_tensors_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (lambda t: t, lambda t: t)

    def pack(t: Tensor):
        recipe = _recipe(t)
        if recipe is None:
            return (False, outer_pack(t))
        kept = tuple(outer_pack(x) for x in recipe.kept())
        versions = tuple(x._version for x in recipe.kept())
        return (True, (recipe, kept, versions, tuple(t.shape), t.stride(), t.storage_offset()))

    def unpack(packed):
        rebuild, payload = packed
        if not rebuild:
            return outer_unpack(payload)
        recipe, kept, versions, shape, stride, offset = payload
        kept = tuple(outer_unpack(x) for x in kept)
        if tuple(x._version for x in kept) != versions:
            raise RuntimeError("daGPAM: a tensor needed to rebuild an attention input for the backward pass was "
                               "modified in place after the forward pass")
        rebuilt = recipe.rebuild(kept)
        return rebuilt.as_strided(shape, stride, offset)

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


def fused_dagpam(
    q: Tensor, k: Tensor, v: Tensor, w_q_neg: Tensor, lambda_pos: Lambda, lambda_neg: Lambda, mask: Mask,
    dropout_p: float, rebuildable: bool = True,
) -> Tensor:
    """The fused path of :func:`dagpam_attention`: both query sets in one kernel call, then
    the signed combination.

    ``rebuildable``: the combination can be rebuilt instead of kept (see
    :func:`recomputed_instead_of_saved`), and so can the stacked queries when q shares its
    storage with K and V (self-attention: one projection GEMM, which the kernel keeps anyway
    for K and V), so that the kernel keeps nothing a stock attention would not: rebuilding
    them costs two kernels of the size of q (:class:`StackedQueries`). Otherwise (cross
    attention) q's storage would be kept for the rebuild alone, and the stacked tensor is kept.
    """
    rebuild_queries = rebuildable and shares_storage(q, k)
    with recomputed_instead_of_saved() if rebuild_queries else nullcontext():
        # fairseq's future mask without padding: no mask tensor, is_causal (FlashAttention's path); heads
        # 2h, 2h+1 hold Q+, Q- of head h, and grouped-query attention reads K, V head h for both
        if mask.causal and can_share_kv_heads(q, k, v, dropout_p):
            both = fused_attention(query_pair(q, w_q_neg, True, rebuild_queries), k, v, None, dropout_p, causal=True, gqa=True)
            pair = both.unflatten(1, (q.size(1), 2))
        # otherwise Q+ above Q- on the query axis: a mask that does not depend on the query
        # broadcasts (a causal mask, where no fused kernel takes grouped-query heads, is a tensor)
        else:
            bias = Mask(mask.dense_bias(q, k)).stacked_bias() if mask.causal else mask.stacked_bias()
            both = fused_attention(query_pair(q, w_q_neg, False, rebuild_queries), k, v, bias, dropout_p)
            pair = both.unflatten(2, (2, q.size(2)))
    return signed_combination(pair, lambda_pos, lambda_neg, mask.empty_rows, physical_order(q), rebuildable)


def shares_storage(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are views of one storage (q, k and v of one projection GEMM)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
