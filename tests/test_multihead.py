"""GPAMMultiheadAttention as a drop-in for fairseq.modules.MultiheadAttention."""

import pytest
import torch
from fairseq.modules import MultiheadAttention

from gpam_fairseq.modules.transformer import build_attention
from gpam_fairseq.options import GPAMOptions

E, H, B, T, S = 32, 4, 3, 7, 9  # embed dim, heads, batch, target length, source length
ROLES = {
    "enc_self": dict(self_attention=True),
    "dec_self": dict(self_attention=True),
    "cross": dict(encoder_decoder_attention=True, kdim=24, vdim=24),
}


def stock_and_ours(role, attention_type="softmax", dtype=torch.float32, seed=0, options=None, **extra):
    torch.manual_seed(seed)
    kwargs = {**ROLES[role], **extra}
    stock = MultiheadAttention(E, H, **kwargs)
    opts = options or GPAMOptions(attention_type=attention_type)
    ours = build_attention(role, opts, E, H, **kwargs)
    missing, unexpected = ours.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mechanism.") for k in missing)
    return stock.to(dtype).eval(), ours.to(dtype).eval()


def future_mask(t, dtype=torch.float32):
    return torch.triu(torch.full((t, t), float("-inf"), dtype=dtype), 1)


def inputs(role, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, E, generator=g, dtype=dtype)
    if role == "cross":
        mem = torch.randn(S, B, 24, generator=g, dtype=dtype)
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, :3] = True  # left padding, as fairseq's source side
        return dict(query=x, key=mem, value=mem, key_padding_mask=kpm, static_kv=True)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, -2:] = True
    if role == "dec_self":
        return dict(query=x, key=x, value=x, key_padding_mask=kpm, attn_mask=future_mask(T, dtype))
    return dict(query=x, key=x, value=x, key_padding_mask=kpm)


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_softmax_equals_stock(role, dtype, atol, monkeypatch):
    if dtype == torch.float64:
        # stock's explicit path (cross attention) always takes its softmax in fp32; let
        # it keep float64 so that the comparison can be exact to 1e-10
        import fairseq.utils

        monkeypatch.setattr(
            fairseq.utils, "softmax", lambda x, dim, onnx_trace=False: torch.softmax(x, dim=dim, dtype=x.dtype)
        )
    stock, ours = stock_and_ours(role, dtype=dtype)
    args = inputs(role, dtype)
    for need_weights, head in ((False, False), (True, False), (True, True)):
        a, wa = stock(**args, need_weights=need_weights, need_head_weights=head)
        b, wb = ours(**args, need_weights=need_weights, need_head_weights=head)
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
        if need_weights:
            if head and role != "cross":
                # stock self-attention takes F.multi_head_attention_forward, which ignores
                # need_head_weights and averages; ours returns what the docstring promises
                assert wb.shape == (H,) + wa.shape
                wb = wb.mean(0)
            assert wb.shape == wa.shape
            torch.testing.assert_close(wb.to(wa.dtype), wa, atol=atol, rtol=0)
        else:
            assert wb is None


def test_softmax_equals_stock_with_bias_kv_and_zero_attn():
    stock, ours = stock_and_ours("dec_self", add_bias_kv=True, add_zero_attn=True)
    args = inputs("dec_self")
    for need_weights in (False, True):
        a, wa = stock(**args, need_weights=need_weights)
        b, wb = ours(**args, need_weights=need_weights)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        if need_weights:  # (B, T, T + 2): the bias key and the zero key appended
            assert wb.shape == wa.shape == (B, T, T + 2)
            torch.testing.assert_close(wb.to(wa.dtype), wa, atol=1e-5, rtol=0)
        else:
            assert wb is None


@pytest.mark.parametrize("role", list(ROLES))
def test_dagpam_with_zero_lambdas_equals_softmax(role):
    opts = GPAMOptions(attention_type="dagpam", lambda_pos=0.0, lambda_neg=0.0, neg_query_init="random")
    _, soft = stock_and_ours(role)
    _, ours = stock_and_ours(role, options=opts)
    assert ours.attention_type == "dagpam"
    args = inputs(role)
    for need_weights, head in ((False, False), (True, False), (True, True)):
        a, wa = soft(**args, need_weights=need_weights, need_head_weights=head)
        b, wb = ours(**args, need_weights=need_weights, need_head_weights=head)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        if need_weights:  # the signed map with zero lambdas is the softmax map
            assert wb.shape == wa.shape == ((H,) if head else ()) + (B, T, S if role == "cross" else T)
            torch.testing.assert_close(wb, wa, atol=1e-6, rtol=0)
        else:
            assert wa is None and wb is None


@pytest.mark.parametrize("role", list(ROLES))
def test_returned_weights_are_signed_with_fixed_row_sum(role):
    opts = GPAMOptions(lambda_pos=0.25, lambda_neg=0.5)
    _, ours = stock_and_ours(role, options=opts)
    args = inputs(role)
    out_fused, none = ours(**args, need_weights=False)
    out, w = ours(**args, need_head_weights=True)  # (H, B, Tq, Tk)
    assert none is None
    torch.testing.assert_close(out_fused, out, atol=1e-5, rtol=0)
    kpm = args["key_padding_mask"]
    assert torch.all(w.permute(1, 0, 2, 3)[kpm[:, None, None, :].expand(-1, H, w.size(2), -1)] == 0)
    torch.testing.assert_close(w.sum(-1), torch.full_like(w.sum(-1), 0.75), atol=1e-5, rtol=0)
    assert (w < 0).any()
    _, w_avg = ours(**args, need_weights=True)
    torch.testing.assert_close(w_avg, w.mean(0))


def test_before_softmax_scores():
    stock, ours = stock_and_ours("cross")
    args = inputs("cross")
    (s_stock, v_stock), (s_ours, v_ours) = (m(**args, before_softmax=True) for m in (stock, ours))
    torch.testing.assert_close(s_ours, s_stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_ours, v_stock)
    _, dag = stock_and_ours("cross", options=GPAMOptions())
    scores, _ = dag(**args, before_softmax=True)
    assert scores.shape == (2,) + s_stock.shape
    torch.testing.assert_close(scores[0], s_stock, atol=1e-5, rtol=0)


def incremental_self_attention(module, x, state=None):
    """Feed x (T, B, E) one step at a time through the cache; returns (T, B, E)."""
    state = {} if state is None else state
    outs = [module(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=False)[0] for t in range(x.size(0))]
    return torch.cat(outs), state


@pytest.mark.parametrize("attention_type", ["softmax", "dagpam"])
def test_incremental_self_attention_equals_causal_forward(attention_type):
    _, ours = stock_and_ours("dec_self", attention_type)
    x = inputs("dec_self")["query"]
    full, _ = ours(x, x, x, attn_mask=future_mask(T), need_weights=False)
    steps, state = incremental_self_attention(ours, x)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    cache = ours._get_input_buffer(state)
    assert cache["prev_key"].shape == (B, H, T, E // H)


@pytest.mark.parametrize("attention_type", ["softmax", "dagpam"])
def test_incremental_cross_attention_equals_full(attention_type):
    _, ours = stock_and_ours("cross", attention_type)
    args = inputs("cross")
    full, w_full = ours(**args, need_head_weights=True)
    state, outs, ws = {}, [], []
    for t in range(T):
        o, w = ours(args["query"][t : t + 1], args["key"], args["value"], key_padding_mask=args["key_padding_mask"],
                    incremental_state=state, static_kv=True, need_head_weights=True)
        outs.append(o)
        ws.append(w)
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(ws, dim=2), w_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention_type", ["softmax", "dagpam"])
def test_beam_reorder_like_sequence_generator(attention_type):
    """Reorder as beam search does: parents chosen within each sentence's beam (repeats
    allowed), then a finished sentence dropped; the next step must equal a fresh
    computation on the reordered histories."""
    beam, n_sent, steps = 3, 3, 4
    bsz = beam * n_sent
    _, self_attn = stock_and_ours("dec_self", attention_type, seed=3)
    _, cross = stock_and_ours("cross", attention_type, seed=4)
    g = torch.Generator().manual_seed(5)
    hist = torch.randn(steps, bsz, E, generator=g)
    mem = torch.randn(S, n_sent, 24, generator=g).repeat_interleave(beam, dim=1)
    mem_kpm = torch.zeros(bsz, S, dtype=torch.bool)
    mem_kpm[: beam, :2] = True

    state = {}
    for t in range(steps):
        self_attn(hist[t : t + 1], hist[t : t + 1], hist[t : t + 1], incremental_state=state, need_weights=False)
        cross(hist[t : t + 1], mem, mem, key_padding_mask=mem_kpm, incremental_state=state, static_kv=True, need_weights=False)

    # 1) parents within each beam (SequenceGenerator's cand_bbsz_idx), 2) sentence 1 finished
    parents = torch.tensor([[2, 2, 0], [1, 0, 0], [0, 2, 1]])
    new_order = (parents + torch.arange(n_sent)[:, None] * beam).flatten()
    kept = torch.tensor([0, 2])
    self_attn.reorder_incremental_state(state, new_order)
    cross.reorder_incremental_state(state, new_order)
    shrink = (torch.arange(n_sent * beam).view(n_sent, beam)[kept]).flatten()
    self_attn.reorder_incremental_state(state, shrink)
    cross.reorder_incremental_state(state, shrink)

    order = new_order[shrink]
    x_new = torch.randn(1, order.numel(), E, generator=g)
    got_self, _ = self_attn(x_new, x_new, x_new, incremental_state=state, need_weights=False)
    got_cross, _ = cross(x_new, None, None, key_padding_mask=None, incremental_state=state, static_kv=True, need_weights=False)

    seq = torch.cat([hist[:, order], x_new])
    want_self, _ = self_attn(seq, seq, seq, attn_mask=future_mask(steps + 1), need_weights=False)
    want_cross, _ = cross(x_new, mem[:, order], mem[:, order], key_padding_mask=mem_kpm[order], static_kv=True, need_weights=False)
    torch.testing.assert_close(got_self, want_self[-1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_cross, want_cross, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention_type", ["softmax", "dagpam"])
def test_beamable_cross_attention_equals_plain(attention_type):
    beam = 2
    _, ours = stock_and_ours("cross", attention_type)
    args = inputs("cross")
    q = args["query"].repeat_interleave(beam, dim=1)
    mem = args["key"].repeat_interleave(beam, dim=1)
    kpm = args["key_padding_mask"].repeat_interleave(beam, dim=0)
    plain, w_plain = ours(q, mem, mem, key_padding_mask=kpm, static_kv=True, need_head_weights=True)
    ours.set_beam_size(beam)
    state = {}
    folded, w_folded = ours(q, mem, mem, key_padding_mask=kpm, incremental_state=state, static_kv=True, need_head_weights=True)
    assert ours._get_input_buffer(state)["prev_key"].size(0) == B  # one copy per sentence
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_folded, w_plain, atol=1e-5, rtol=0)
    again, _ = ours(q, None, None, incremental_state=state, static_kv=True, need_weights=False)
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=0)


def test_gradients_reach_w_q_neg_and_lambdas_gradcheck():
    opts = GPAMOptions(lambda_pos=0.3, lambda_neg=0.2, trainable_lambda=True, lambda_scope="head", neg_query_init="random")
    torch.manual_seed(0)
    module = build_attention("dec_self", opts, 8, 2, self_attention=True).double()
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    mech = module.mechanism
    names = ["w_q_neg", "lambda_pos_theta", "lambda_neg_theta"]
    params = tuple(getattr(mech, n).detach().clone().requires_grad_(True) for n in names)

    def f(*p):
        out, _ = torch.func.functional_call(mech, dict(zip(names, p)), (module._split_heads(x, 2),) * 3)
        return out

    assert torch.autograd.gradcheck(f, params)
    out, _ = module(x, x, x, attn_mask=future_mask(3, torch.float64))
    out.pow(2).sum().backward()
    for n in names:
        g = getattr(mech, n).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_lambdas_stay_fp32_under_half_and_output_is_finite():
    opts = GPAMOptions(trainable_lambda=True)
    _, ours = stock_and_ours("dec_self", options=opts)
    ours = ours.half()
    assert ours.q_proj.weight.dtype == torch.float16
    assert ours.mechanism.w_q_neg.dtype == torch.float16
    assert ours.mechanism.lambda_pos_theta.dtype == torch.float32
    bf = stock_and_ours("dec_self", options=opts)[1].to(torch.bfloat16)
    args = inputs("dec_self", torch.bfloat16)
    args["query"] = args["key"] = args["value"] = args["query"] * 100  # very large scores
    for need_weights in (False, True):
        out, _ = bf(**args, need_weights=need_weights)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    _, fp32 = stock_and_ours("dec_self", options=opts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = fp32(**inputs("dec_self"), need_weights=True)
    assert torch.isfinite(out).all() and w.dtype == torch.float32
