"""Every fast path of daGPAM against the literal float64 reference of test_functional.py.

The fast paths (gpam_fairseq/attention/functional.py, multihead.py): the fused path with
both query sets stacked into one kernel call (mask independent of the query: padding,
cross attention, incremental steps), the fused path with two calls (causal masks), the
explicit path with one score product and one softmax for both maps and one product with V
(with and without dropout), the beam-folded cross attention, and the cached K,V of
incremental decoding. Each is checked in float64 on random inputs against a reference
that is written out head by head and row by row.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_functional import bias_from, make_case, reference_dagpam

from gpam_fairseq.attention import functional as Fn
from gpam_fairseq.modules.transformer import build_attention
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
    fused, none = Fn.dagpam_attention(q, k, v, w, lp, ln, bias)
    explicit, weights = Fn.dagpam_attention(q, k, v, w, lp, ln, bias, need_weights=True)
    assert none is None
    torch.testing.assert_close(fused, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=ATOL, rtol=0)


def test_explicit_dropout_equals_two_products_with_the_same_masks():
    """One dropout call on the stacked maps, one product with V == the two-product form."""
    q, k, v, w, masked = make_case("causal", seed=11)
    bias = bias_from(masked)
    torch.manual_seed(123)
    out, weights = Fn.dagpam_attention(q, k, v, w, LP, LN, bias, dropout_p=0.4, need_weights=True)
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
        out, _ = Fn.dagpam_attention(q, k, v, w, LP, LN, bias_from(masked), need_weights=need_weights)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in (q, k, v, w)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_bf16_explicit_path_close_to_reference():
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, Tq=12, Tk=12, d=16, seed=2)
    ref, ref_w = reference_dagpam(q, k, v, w, LP, LN, masked)
    out, weights = Fn.dagpam_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), w.bfloat16(), LP, LN,
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
        outs = [Fn.dagpam_attention(*cuda[:4], LP, LN, cuda[4], need_weights=nw)[0] for nw in (False, True)]
        sum(o.float().sum() for o in outs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out in outs:
        assert math.isfinite(out.float().abs().max().item())
        torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine")
@pytest.mark.parametrize("role", ["enc_self", "dec_self", "cross"])
def test_cuda_module_matches_cpu_float64_and_never_synchronizes(role):
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
