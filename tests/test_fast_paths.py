"""Every fast path of daGPAM against the literal float64 reference of test_functional.py.

The fast paths (gpam_fairseq/attention/fused.py, paths.py, multihead.py): the fused path,
which stacks both query sets into one ``scaled_dot_product_attention`` call for both maps
(on the head axis with ``is_causal`` for the causal mask where a fused kernel takes
grouped-query heads; otherwise on the query axis, the mask a tensor: padding, cross
attention, incremental steps, the causal mask elsewhere) and combines their outputs with
their signs in one more kernel, rebuilding the stacked queries in the backward pass in
self-attention instead of keeping them; the explicit path with one score product and one
softmax for both maps and one product with V (with and without dropout), the beam-folded
cross attention, and the cached K,V of incremental decoding. Each is checked in float64 on
random inputs against a reference that is written out head by head and row by row.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_functional import bias_from, make_case, reference_dagpam

from gpam_fairseq.attention import functional as Fn
from gpam_fairseq.attention import fused as Fused, masks as Masks, paths as Paths
from gpam_fairseq.attention.multihead import mark_causal, project
from gpam_fairseq.modules.transformer import build_attention
from gpam_fairseq.measurement.profiling import count_pass
from gpam_fairseq.options import GPAMOptions

E, H, B, T, S = 32, 4, 3, 6, 8
ATOL = 1e-10
LP, LN = 0.3, 0.45


# ----------------------------------------------------------------------------- functional


def test_all_keys_masked_and_signed_sum():
    g = torch.Generator().manual_seed(0)
    masked = torch.rand(4, 3, 5, 7, generator=g) < 0.6
    masked[0, 1, 2] = True
    masked[3, 0, 4] = True
    bias = torch.zeros(masked.shape, dtype=torch.float64).masked_fill(masked, float("-inf"))
    assert torch.equal(Fn.all_keys_masked(bias), masked.all(-1, keepdim=True))
    a, b = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(Fn.signed_sum(a, b, LP, LN), (1 + LP) * a - LN * b, atol=ATOL, rtol=0)
    lp, ln = torch.rand(2, 3, 1, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(Fn.signed_sum(a, b, lp[0], ln[0]), (1 + lp[0]) * a - ln[0] * b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["padding", "causal", "cross", "fully_masked"])
def test_stacked_probabilities_equal_two_separate_softmaxes(kind):
    q, k, _, w, masked = make_case(kind, per_head=True)
    bias = bias_from(masked)
    probs = Fn.dagpam_probabilities(q, k, w, bias)
    assert probs.shape == q.shape[:2] + (2, q.size(2), k.size(2))
    separate = [Fn.masked_softmax(Fn.attention_scores(x, k, bias)) for x in (q, Fn.negative_query(q, w))]
    torch.testing.assert_close(probs[:, :, 0], separate[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(probs[:, :, 1], separate[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["padding", "causal", "cross", "fully_masked"])
@pytest.mark.parametrize("trainable", [False, True])
def test_every_path_matches_reference_with_tensor_or_float_lambdas(kind, trainable):
    """Fused (stacked or two calls, by mask kind) and explicit, float and per-head tensor lambdas."""
    q, k, v, w, masked = make_case(kind, per_head=trainable, seed=7)
    if trainable:
        lp = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).view(-1, 1, 1)
        ln = torch.tensor([0.5, 0.0, 0.25, 1.0], dtype=torch.float64).view(-1, 1, 1)
    else:
        lp, ln = LP, LN
    ref_out, ref_w = reference_dagpam(q, k, v, w, lp, ln, masked)
    bias = bias_from(masked)
    fused, none = Paths.dagpam_attention(q, k, v, w, lp, ln, bias)
    explicit, weights = Paths.dagpam_attention(q, k, v, w, lp, ln, bias, need_weights=True)
    assert none is None
    torch.testing.assert_close(fused, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=ATOL, rtol=0)


def test_explicit_dropout_equals_two_products_with_the_same_masks():
    """One dropout call on the stacked maps, one product with V == the two-product form."""
    q, k, v, w, masked = make_case("causal", seed=11)
    bias = bias_from(masked)
    torch.manual_seed(123)
    out, weights = Paths.dagpam_attention(q, k, v, w, LP, LN, bias, dropout_p=0.4, need_weights=True)
    torch.manual_seed(123)
    dropped = F.dropout(Fn.dagpam_probabilities(q, k, w, bias), 0.4, training=True)
    want = (1 + LP) * (dropped[:, :, 0] @ v) - LN * (dropped[:, :, 1] @ v)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    # the masks of the two maps are independent draws
    kept = dropped != 0
    assert not torch.equal(kept[:, :, 0], kept[:, :, 1])
    _, ref_w = reference_dagpam(q, k, v, w, LP, LN, masked)
    torch.testing.assert_close(weights, ref_w, atol=ATOL, rtol=0)  # weights: un-dropped P_G


@pytest.mark.parametrize("kind", ["padding", "causal", "cross"])
def test_fused_and_explicit_gradients_agree(kind):
    grads = []
    for need_weights in (False, True):
        q, k, v, w, masked = make_case(kind, seed=5)
        for t in (q, k, v, w):
            t.requires_grad_(True)
        out, _ = Paths.dagpam_attention(q, k, v, w, LP, LN, bias_from(masked), need_weights=need_weights)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in (q, k, v, w)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_bf16_explicit_path_close_to_reference():
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, Tq=12, Tk=12, d=16, seed=2)
    ref, ref_w = reference_dagpam(q, k, v, w, LP, LN, masked)
    out, weights = Paths.dagpam_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), w.bfloat16(), LP, LN,
                                       bias_from(masked).bfloat16(), need_weights=True)
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(weights.double(), ref_w, atol=3e-2, rtol=0)


# ----------------------------------------------------------------------------- module


def dagpam_module(role, seed=0, **kwargs):
    torch.manual_seed(seed)
    opts = GPAMOptions(attention_type="dagpam", lambda_pos=LP, lambda_neg=LN, neg_query_init="random")
    extra = dict(self_attention=True) if role != "cross" else dict(encoder_decoder_attention=True, kdim=24, vdim=24)
    return build_attention(role, opts, E, H, **extra, **kwargs).double().eval()


def module_reference(module, query, key, masked):
    """The module's projections by hand, then the literal reference per head, then out_proj.

    query (Tq, B, E), key (Tk, B, kdim), masked bool (B, Tq, Tk)."""
    split = lambda x: x.view(x.size(0), x.size(1), H, E // H).permute(1, 2, 0, 3)
    q, k, v = split(module.q_proj(query)), split(module.k_proj(key)), split(module.v_proj(key))
    out, weights = reference_dagpam(q, k, v, module.mechanism.w_q_neg, LP, LN, masked)
    out = module.out_proj(out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), E))
    return out, weights.transpose(0, 1)  # weights per head: (H, B, Tq, Tk), as the module returns


def causal(tq, tk):
    return torch.ones(tq, tk).triu(tk - tq + 1).bool()


@torch.no_grad()
@pytest.mark.parametrize("role", ["enc_self", "dec_self"])
def test_module_self_attention_paths_match_reference(role):
    module = dagpam_module(role)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, E, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[2, :3] = True
    masked = kpm[:, None, :].expand(B, T, T).clone()
    extra = {}
    if role == "dec_self":
        extra["attn_mask"] = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
        masked |= causal(T, T)
    want, want_w = module_reference(module, x, x, masked)
    fused, _ = module(x, x, x, key_padding_mask=kpm, need_weights=False, **extra)
    explicit, weights = module(x, x, x, key_padding_mask=kpm, need_head_weights=True, **extra)
    torch.testing.assert_close(fused, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, want_w, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("need_weights", [False, True])
def test_incremental_self_attention_steps_reuse_the_cache_and_match_reference(need_weights):
    """Each step adds one key/value to the cache; both maps read that one cache."""
    module = dagpam_module("dec_self", seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, E, generator=g, dtype=torch.float64)
    want, _ = module_reference(module, x, x, causal(T, T).expand(B, T, T))
    state, outs = {}, []
    for t in range(T):
        out, _ = module(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=need_weights)
        outs.append(out)
        cache = module._get_input_buffer(state)
        assert cache["prev_key"].shape == (B, H, t + 1, E // H)  # one K cache, not one per map
        assert cache["prev_value"].shape == (B, H, t + 1, E // H)
    torch.testing.assert_close(torch.cat(outs), want, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("need_weights", [False, True])
def test_incremental_beam_folded_cross_attention_matches_reference(beam, need_weights):
    module = dagpam_module("cross", seed=4)
    module.set_beam_size(beam)
    g = torch.Generator().manual_seed(5)
    n = 2
    mem = torch.randn(S, n, 24, generator=g, dtype=torch.float64).repeat_interleave(beam, dim=1)
    kpm = torch.zeros(n, S, dtype=torch.bool)
    kpm[0, :3] = True  # left padding, as fairseq's source side
    kpm = kpm.repeat_interleave(beam, dim=0)
    x = torch.randn(T, n * beam, E, generator=g, dtype=torch.float64)
    want, want_w = module_reference(module, x, mem, kpm[:, None, :].expand(n * beam, T, S))
    state, outs, ws = {}, [], []
    for t in range(T):
        key = mem if t == 0 else None  # fairseq passes the encoder output, then reuses the cache
        out, w = module(x[t : t + 1], key, key, key_padding_mask=kpm, incremental_state=state, static_kv=True,
                        need_head_weights=need_weights)
        outs.append(out)
        ws.append(w)
    assert module._get_input_buffer(state)["prev_key"].size(0) == n  # one K,V copy per sentence
    torch.testing.assert_close(torch.cat(outs), want, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(torch.cat(ws, dim=2), want_w, atol=ATOL, rtol=0)


def test_module_gradients_fused_equal_explicit():
    grads = []
    for need_weights in (False, True):
        module = dagpam_module("dec_self", seed=6).train()
        g = torch.Generator().manual_seed(7)
        x = torch.randn(T, B, E, generator=g, dtype=torch.float64, requires_grad=True)
        mask = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[0, -1] = True
        out, _ = module(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights)
        (out * torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)).sum().backward()
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_paths_match_reference_and_never_synchronize(dtype):
    """On a GPU: fused and explicit paths against the float64 CPU reference, and no host
    synchronisation on the hot path (what CUDA graphs need): torch raises on any sync."""
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, B=2, H=4, Tq=33, Tk=33, d=16, seed=9)
    ref, _ = reference_dagpam(q, k, v, w, LP, LN, masked)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    cuda = [t.cuda().to(dtype) for t in (q, k, v, w, bias_from(masked))]
    for t in cuda[:3]:
        t.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [Paths.dagpam_attention(*cuda[:4], LP, LN, cuda[4], need_weights=nw)[0] for nw in (False, True)]
        sum(o.float().sum() for o in outs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out in outs:
        assert math.isfinite(out.float().abs().max().item())
        torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine")
@pytest.mark.parametrize("role", ["enc_self", "dec_self", "dec_self_marked", "cross"])
def test_cuda_module_matches_cpu_float64_and_never_synchronizes(role):
    """dec_self_marked: fairseq's future mask as our decoder marks it (the causal path without
    padding, the prefix rule for rows without keys with padding)."""
    marked = role == "dec_self_marked"
    role = "dec_self" if marked else role
    module = dagpam_module(role, seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, B, E, generator=g, dtype=torch.float64)
    key = torch.randn(S, B, 24, generator=g, dtype=torch.float64) if role == "cross" else x
    kpm = torch.zeros(B, key.size(0), dtype=torch.bool)
    kpm[1, -2:] = True
    extra = dict(static_kv=True) if role == "cross" else {}
    if role == "dec_self":
        extra["attn_mask"] = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
    want = [module(x, key, key, key_padding_mask=kpm, need_weights=nw, **extra)[0] for nw in (False, True)]
    gpu = module.float().cuda()
    args = dict(key_padding_mask=kpm.cuda(), **{n: (t.float().cuda() if torch.is_tensor(t) else t) for n, t in extra.items()})
    if marked:
        args["attn_mask"] = mark_causal(args["attn_mask"])
    xq, xk = x.float().cuda().requires_grad_(True), key.float().cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [gpu(xq, xk, xk, need_weights=nw, **args)[0] for nw in (False, True)]
        sum(o.sum() for o in got).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_causal_path_and_fully_masked_rows(dtype):
    """On a GPU, the causal path (grouped-query heads and is_causal where a fused kernel takes
    them) against the float64 reference, and rows whose keys are all masked: zero outputs and
    finite gradients whatever the backend returns for them, with no host synchronisation."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, B=2, H=4, Tq=33, Tk=33, d=16, seed=10)
    masked[:] = causal(33, 33)
    ref, _ = reference_dagpam(q, k, v, w, LP, LN, masked)
    fq, fk, fv, fw = make_case("fully_masked", dtype=torch.float32, B=3, H=4, Tq=9, Tk=9, d=16, seed=11)[:4]
    f_masked = make_case("fully_masked", B=3, H=4, Tq=9, Tk=9, d=16, seed=11)[4]
    f_ref, _ = reference_dagpam(fq, fk, fv, fw, LP, LN, f_masked)
    cuda = [t.cuda().to(dtype).requires_grad_(i < 3) for i, t in enumerate((q, k, v, w))]
    f_cuda = [t.cuda().to(dtype).requires_grad_(i < 3) for i, t in enumerate((fq, fk, fv, fw))]
    f_bias = bias_from(f_masked).cuda().to(dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = Paths.dagpam_attention(*cuda, LP, LN, Masks.Mask(causal=True))
        f_out, _ = Paths.dagpam_attention(*f_cuda, LP, LN, Masks.Mask(f_bias))
        (out.float().sum() + f_out.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(f_out.double().cpu(), f_ref, atol=tol, rtol=tol)
    assert (f_out[2] == 0).all()
    for t in cuda[:3] + f_cuda[:3]:
        assert torch.isfinite(t.grad).all()
    if dtype != torch.float32:  # FlashAttention takes grouped-query heads in half precision
        assert Fused.can_share_kv_heads(cuda[0].repeat(1, 2, 1, 1), cuda[1], cuda[2], 0.0)


# ----------------------------------------------------------------------------- one fused call


def causal_mask_object():
    return Masks.Mask(causal=True)


@pytest.mark.parametrize("trainable", [False, True])
def test_causal_flag_path_matches_reference_and_dense_mask_path(trainable):
    """The causal Mask (no tensor: grouped-query heads, is_causal) against the reference and
    against the same mask given as a tensor (query-axis layout), values and gradients."""
    q, k, v, w, masked = make_case("causal", seed=21, per_head=trainable)
    masked[:] = causal(q.size(2), k.size(2))  # the causal mask alone: the flag's case
    lp, ln = (torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).view(-1, 1, 1),
              torch.tensor([0.5, 0.0, 0.25, 1.0], dtype=torch.float64).view(-1, 1, 1)) if trainable else (LP, LN)
    ref, _ = reference_dagpam(q, k, v, w, lp, ln, masked)
    grads = []
    for mask in (causal_mask_object(), bias_from(masked)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
        out, _ = Paths.dagpam_attention(*leaves, lp, ln, mask)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        (out * torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_stacked_queries_are_views_in_the_memory_order_of_q():
    """One copy lays Q+ and Q- out in q's memory order; the halves read back exactly."""
    g = torch.Generator().manual_seed(3)
    phys = torch.randn(T, B, H, 8, generator=g, dtype=torch.float64)  # fairseq's (T, B, H, d) order
    q = phys.permute(1, 2, 0, 3)
    q_neg = torch.randn(B, H, T, 8, generator=g, dtype=torch.float64)
    for on_heads, shape in ((True, (B, 2 * H, T, 8)), (False, (B, H, 2 * T, 8))):
        both = Fused.stack_queries(q, q_neg, on_heads)
        assert both.shape == shape and both._base is not None  # a view of the one stacked copy
        pos, neg = Fused._unstack_queries(both, on_heads, q.shape)
        assert torch.equal(pos, q) and torch.equal(neg, q_neg)
        assert Fn.physical_order(pos) == Fn.physical_order(q)


@pytest.mark.parametrize("lambdas", [(0.3, 0.3), (0.3, 0.45), (0.0, 1.0), (0.5, 0.0)])
def test_signed_combination_every_branch(lambdas):
    """lerp (row sum 1), lerp and scale (other row sums), a difference (row sum 0); rows to
    zero; result laid out in the requested memory order; gradient against autograd's."""
    lp, ln = lambdas
    g = torch.Generator().manual_seed(4)
    pair = torch.randn(B, H, 2, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.zeros(B, 1, T, 1, dtype=torch.bool)
    rows[1, 0, 2] = True
    order = [2, 0, 1, 3]
    out = Fused.signed_combination(pair, lp, ln, rows, order)
    want = ((1 + lp) * pair[:, :, 0] - ln * pair[:, :, 1]).masked_fill(rows, 0.0)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    assert out.permute(order).is_contiguous()  # merging the heads afterwards is a view
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weight).sum(), pair)
    (want_grad,) = torch.autograd.grad((want * weight).sum(), pair)
    torch.testing.assert_close(grad, want_grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["padding", "causal_padding", "general"])
def test_mask_from_parts_matches_the_plain_bias(kind):
    """The Mask the module builds from fairseq's masks: its bias, its stacked bias (built in
    one addition) and its rows without keys equal what the plain bias gives."""
    g = torch.Generator().manual_seed(5)
    kpm = torch.rand(B, T, generator=g) < 0.3
    kpm[0] = True  # a sequence of pads: no key for any row
    kpm[1, :3] = True  # left padding: with the causal mask, rows 0..2 see no key
    attn = None
    if kind == "causal_padding":
        attn = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1).view(1, 1, T, T)
    if kind == "general":
        attn = torch.zeros(1, 1, T, T, dtype=torch.float64).masked_fill(torch.rand(T, T, generator=g) < 0.3, float("-inf"))
    parts = Masks.Mask.from_parts(attn, kpm, torch.float64, causal_bias=kind == "causal_padding")
    pad_bias = torch.zeros(B, 1, 1, T, dtype=torch.float64).masked_fill(kpm.view(B, 1, 1, T), float("-inf"))
    plain = pad_bias if attn is None else attn + pad_bias
    stacked = parts.stacked_bias()  # first, before the bias: built from the parts directly
    torch.testing.assert_close(parts.bias, plain, atol=0, rtol=0)
    torch.testing.assert_close(stacked, Masks.Mask(plain).stacked_bias(), atol=0, rtol=0)
    rows = Fn.all_keys_masked(plain)
    assert torch.equal(parts.empty_rows.expand_as(rows), rows)
    assert rows.any() and not rows.all()


def test_stacked_projection_equals_separate_linears_and_falls_back_with_hooks():
    module = dagpam_module("dec_self", seed=9).train()
    g = torch.Generator().manual_seed(10)
    x = torch.randn(T, B, E, generator=g, dtype=torch.float64, requires_grad=True)
    linears = (module.q_proj, module.k_proj, module.v_proj)
    stacked = project(x, *linears)
    separate = [m(x) for m in linears]
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in separate]
    for a, b in zip(stacked, separate):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(stacked, weights)), [x, *module.parameters()],
                              allow_unused=True)
    want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(separate, weights)), [x, *module.parameters()],
                               allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    calls = []
    handle = module.k_proj.register_forward_pre_hook(lambda m, args: calls.append(m))  # e.g. quant-noise
    project(x, *linears)
    handle.remove()
    assert calls == [module.k_proj]  # a hooked projection is called as a module, hook and all


@pytest.mark.parametrize("padded", [False, True])
def test_module_with_fairseqs_future_mask_takes_the_causal_path_and_matches_reference(padded, monkeypatch):
    """Our decoder marks fairseq's future mask; the module then calls the kernel with
    is_causal and no mask tensor (without padding), in fp64 equal to the reference, also
    when the mask arrives detached (activation checkpointing)."""
    module = dagpam_module("dec_self", seed=11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T, B, E, generator=g, dtype=torch.float64)
    full = mark_causal(torch.triu(torch.full((T + 3, T + 3), float("-inf"), dtype=torch.float64), 1))
    kpm = None
    masked = causal(T, T).expand(B, T, T).clone()
    if padded:
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[1, -2:] = True
        masked |= kpm[:, None, :]
    want, _ = module_reference(module, x, x, masked)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    for mask in (full[:T, :T], full[:T, :T].detach()):  # fairseq slices its buffer per length
        out, _ = module(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    assert [kw["is_causal"] for kw in calls] == [not padded] * 2
    assert all((kw["attn_mask"] is None) == (not padded) for kw in calls)
    calls.clear()
    module(x, x, x, attn_mask=torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1))
    assert calls == []  # weights requested: the explicit path
    module(x, x, x, attn_mask=torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1), need_weights=False)
    assert calls[-1]["is_causal"] is False  # an unmarked mask is only a tensor


def test_recomputed_combination_gives_the_same_gradients_and_is_not_kept(monkeypatch):
    """The output projection's input is rebuilt from the fused output in the backward pass:
    gradients are identical to keeping it, and it is not among the saved tensors."""
    import contextlib

    from gpam_fairseq.attention import multihead

    grads, kept = [], []
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(multihead, "recomputed_instead_of_saved", contextlib.nullcontext)
        module = dagpam_module("enc_self", seed=13).train()
        g = torch.Generator().manual_seed(14)
        x = torch.randn(T, B, E, generator=g, dtype=torch.float64, requires_grad=True)
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[2, :2] = True
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out, _ = module(x, x, x, key_padding_mask=kpm, need_weights=False)
        (out * torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)).sum().backward()
        grads.append([x.grad] + [p.grad for p in module.parameters()])
        kept.append({t.untyped_storage().data_ptr() for t in saved})
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert len(kept[0]) == len(kept[1]) - 1  # the combination is the one tensor not kept


# ----------------------------------------------------------------------------- the counter


def test_counter_counts_a_fused_call_once_each_way_and_keeps_its_gradients():
    """With dropout the CPU's SDPA runs a dozen operations; a GPU runs one fused kernel each
    way, and so does the count. The counted pass computes the real outputs and gradients."""
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        counter = count_pass(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p))
        assert dict(counter.ops["forward"]) == {"fused_attention_forward": 1, "sum": 1}
        assert counter.ops["backward"]["fused_attention_backward"] == 1
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(0)
        F.scaled_dot_product_attention(q, k, v, dropout_p=p).float().sum().backward()
        for a, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(a, t.grad, atol=1e-6, rtol=0)
        for t in (q, k, v):
            t.grad = None


def test_counter_skips_views_counts_dropout_as_one_kernel_and_saved_bytes():
    x = torch.randn(4, 6, requires_grad=True)
    counter = count_pass(lambda: F.dropout(x.t().unsqueeze(0).transpose(1, 2)[0].view(24), 0.5, training=True))
    assert dict(counter.ops["forward"]) == {"native_dropout": 1, "sum": 1}
    assert counter.saved_bytes == 24  # the dropout mask, one byte a value; x itself is not saved
    w = torch.nn.Parameter(torch.randn(6, 3))
    counter = count_pass(lambda: x @ w, exclude=[w])
    assert counter.saved_bytes == x.numel() * 4  # x for the weight gradient; the parameter not


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("trainable", [False, True])
def test_recomputed_attention_equals_the_kept_one_and_keeps_less(dropout_p, trainable):
    """--gpam-recompute-attention: the same outputs and gradients (dropout masks drawn again
    from the same state), with fewer bytes kept for the backward pass."""
    opts = GPAMOptions(attention_type="dagpam", lambda_pos=LP, lambda_neg=LN, neg_query_init="random",
                       trainable_lambda=trainable)
    results = []
    for recompute in (False, True):
        torch.manual_seed(16)
        module = build_attention("enc_self", dataclasses.replace(opts, recompute_attention=recompute), E, H,
                                 self_attention=True, dropout=dropout_p).double().train()
        g = torch.Generator().manual_seed(17)
        x = torch.randn(T, B, E, generator=g, dtype=torch.float64, requires_grad=True)
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[1, :2] = True
        torch.manual_seed(18)
        counter = count_pass(lambda: module(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                             exclude=module.parameters())
        results.append((counter, [x.grad] + [p.grad for p in module.parameters()]))
    (kept, grads_kept), (recomputed, grads_recomputed) = results
    for a, b in zip(grads_kept, grads_recomputed):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert recomputed.saved_bytes < kept.saved_bytes
    assert recomputed.ops["backward"]["fused_attention_forward"] == 1  # the one more call


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("trainable", [False, True])
def test_stacked_queries_are_rebuilt_not_kept_when_q_shares_the_kv_storage(causal, dropout_p, trainable):
    """Self-attention (q, k, v views of one projection): the fused kernel's stacked query input
    is rebuilt from q and W_Q- in the backward pass instead of kept; the gradients are those of
    keeping it (q, k, v in separate storages, as in cross attention), to the bit."""
    from gpam_fairseq.measurement.profiling import SavedTensorLedger

    g = torch.Generator().manual_seed(21)
    qkv0 = torch.randn(T, B, 3 * E, generator=g, dtype=torch.float64)
    w0 = torch.randn(E // H, E // H, generator=g, dtype=torch.float64)
    lambdas0 = (torch.tensor([[[LP]]], dtype=torch.float64), torch.tensor([[[LN]]], dtype=torch.float64))
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :2] = True
    mask = Masks.Mask(causal=True) if causal else Masks.Mask.from_parts(None, kpm, torch.float64)
    weights = torch.sin(torch.arange(B * H * T * (E // H), dtype=torch.float64)).view(B, H, T, E // H)
    results = []
    for shared in (True, False):
        qkv = qkv0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        lambdas = [x.clone().requires_grad_(True) for x in lambdas0] if trainable else [LP, LN]
        heads = [t.view(T, B, H, E // H).permute(1, 2, 0, 3) for t in qkv.split(E, dim=-1)]
        q, k, v = heads if shared else [t.clone() for t in heads]
        assert Fused.shares_storage(q, k) == shared
        ledger = SavedTensorLedger()
        torch.manual_seed(22)
        count_pass(lambda: Fused.fused_dagpam(q, k, v, w, *lambdas, mask, dropout_p) * weights, ledger=ledger)
        grads = [qkv.grad, w.grad] + ([x.grad for x in lambdas] if trainable else [])
        results.append((grads, [r["bytes"] for r in ledger.rows() if r["origin"] == "stack"]))
    (rebuilt, kept_rebuilt), (kept, kept_kept) = results
    for a, b in zip(rebuilt, kept):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert kept_rebuilt == [] and kept_kept == [2 * B * T * E * 8]  # [Q+, Q-] in float64


def test_rebuilt_stacked_queries_refuse_a_q_changed_in_place():
    """The rebuild reads q again: a q modified in place after the forward pass is an error, as
    autograd reports for a tensor it keeps."""
    g = torch.Generator().manual_seed(23)
    qkv = torch.randn(T, B, 3 * E, generator=g, dtype=torch.float64)
    w = torch.randn(E // H, E // H, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = [t.view(T, B, H, E // H).permute(1, 2, 0, 3) for t in qkv.split(E, dim=-1)]
    with Fused.recomputed_instead_of_saved():
        both = Fused.query_pair(q, w, on_heads=False, rebuildable=True)
        out = (both * both).sum()
    qkv.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()
