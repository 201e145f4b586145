"""The daGPAM math (gpam_fairseq/attention/functional.py) against a literal reference."""

import math

import pytest
import torch

from gpam_fairseq.attention import paths as Paths

NEG_INF = float("-inf")


def reference_dagpam(q, k, v, w_q_neg, lambda_pos, lambda_neg, masked):
    """The formula of docs/method.md, written out head by head and row by row in float64.

    masked: bool (B, Tq, Tk), True = key not visible. Rows with no visible key give zeros.
    """
    q, k, v, w = (t.double() for t in (q, k, v, w_q_neg))
    B, H, Tq, d = q.shape
    out = torch.zeros(B, H, Tq, v.size(-1), dtype=torch.float64)
    weights = torch.zeros(B, H, Tq, k.size(2), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            w_h = w if w.dim() == 2 else w[h]
            lp = lambda_pos if isinstance(lambda_pos, float) else float(lambda_pos.flatten()[h % lambda_pos.numel()])
            ln = lambda_neg if isinstance(lambda_neg, float) else float(lambda_neg.flatten()[h % lambda_neg.numel()])
            q_pos = q[b, h]
            q_neg = torch.relu(q_pos) @ w_h
            for i in range(Tq):
                visible = ~masked[b, i]
                if not visible.any():
                    continue
                s_pos = (k[b, h][visible] @ q_pos[i]) / math.sqrt(d)
                s_neg = (k[b, h][visible] @ q_neg[i]) / math.sqrt(d)
                p = (1 + lp) * torch.softmax(s_pos, 0) - ln * torch.softmax(s_neg, 0)
                weights[b, h, i, visible] = p
                out[b, h, i] = p @ v[b, h][visible]
    return out, weights


def bias_from(masked):
    return torch.zeros(masked.shape, dtype=torch.float64).masked_fill(masked, NEG_INF).unsqueeze(1)


def make_case(kind, dtype=torch.float64, B=3, H=4, Tq=6, Tk=6, d=8, seed=0, per_head=False):
    g = torch.Generator().manual_seed(seed)
    if kind == "cross":
        Tk = Tq + 3
    q, k, v = (torch.randn(B, H, t, d, generator=g, dtype=dtype) for t in (Tq, Tk, Tk))
    w = torch.randn((H, d, d) if per_head else (d, d), generator=g, dtype=dtype) / math.sqrt(d)
    masked = torch.zeros(B, Tq, Tk, dtype=torch.bool)
    masked[1, :, -2:] = True  # padding in one sequence
    if kind == "causal":
        masked |= torch.ones(Tq, Tk).triu(1).bool()
    if kind == "fully_masked":
        masked[2] = True  # a sequence whose keys are all padding
    return q, k, v, w, masked


CASES = ["padding", "causal", "cross", "fully_masked"]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_literal_reference_in_float64(kind, per_head, need_weights):
    q, k, v, w, masked = make_case(kind, per_head=per_head)
    lambda_pos, lambda_neg = 0.3, 0.45
    ref_out, ref_w = reference_dagpam(q, k, v, w, lambda_pos, lambda_neg, masked)
    out, weights = Paths.dagpam_attention(q, k, v, w, lambda_pos, lambda_neg, bias_from(masked).to(q.dtype), need_weights=need_weights)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    if need_weights:
        torch.testing.assert_close(weights, ref_w, atol=1e-10, rtol=0)
    else:
        assert weights is None


@pytest.mark.parametrize("kind", CASES)
def test_per_head_trainable_lambdas_match_reference(kind):
    q, k, v, w, masked = make_case(kind)
    lp = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).view(-1, 1, 1)
    ln = torch.tensor([0.5, 0.0, 0.25, 1.0], dtype=torch.float64).view(-1, 1, 1)
    ref_out, _ = reference_dagpam(q, k, v, w, lp, ln, masked)
    out, _ = Paths.dagpam_attention(q, k, v, w, lp, ln, bias_from(masked))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", CASES)
def test_fused_equals_explicit_in_fp32(kind):
    q, k, v, w, masked = make_case(kind, dtype=torch.float32, B=4, Tq=20, d=16, seed=3)
    bias = bias_from(masked).float()
    fused, _ = Paths.dagpam_attention(q, k, v, w, 0.2, 0.35, bias, need_weights=False)
    explicit, _ = Paths.dagpam_attention(q, k, v, w, 0.2, 0.35, bias, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


def test_weights_rows_sum_masked_zero_and_negative_entries():
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, Tq=10, d=16)
    masked[0, 4] = True  # one fully masked row inside a sequence
    lambda_pos, lambda_neg = 0.3, 0.5
    _, p_g = Paths.dagpam_attention(q, k, v, -torch.eye(16), lambda_pos, lambda_neg, bias_from(masked).float(), need_weights=True)
    masked4 = masked.unsqueeze(1).expand_as(p_g)
    assert torch.all(p_g[masked4] == 0)
    live = ~masked.all(-1)  # (B, Tq): rows with at least one visible key
    sums = p_g.sum(-1)  # (B, H, Tq)
    torch.testing.assert_close(
        sums.permute(0, 2, 1)[live], torch.full_like(sums.permute(0, 2, 1)[live], 1 + lambda_pos - lambda_neg)
    )
    assert torch.all(sums.permute(0, 2, 1)[~live] == 0)
    assert (p_g < 0).any(), "daGPAM weights should contain negative entries"
    assert p_g.min() >= -lambda_neg - 1e-6 and p_g.max() <= 1 + lambda_pos + 1e-6


def test_zero_lambdas_equal_softmax():
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, d=16)
    bias = bias_from(masked).float()
    for need_weights in (False, True):
        ours, w_ours = Paths.dagpam_attention(q, k, v, w, 0.0, 0.0, bias, need_weights=need_weights)
        soft, w_soft = Paths.softmax_attention(q, k, v, bias, need_weights=need_weights)
        torch.testing.assert_close(ours, soft, atol=1e-6, rtol=0)
        if need_weights:
            torch.testing.assert_close(w_ours, w_soft, atol=1e-6, rtol=0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_are_zero_with_finite_gradients(need_weights):
    q, k, v, w, masked = make_case("fully_masked", dtype=torch.float32)
    q.requires_grad_(True)
    out, _ = Paths.dagpam_attention(q, k, v, w, 0.2, 0.2, bias_from(masked).float(), need_weights=need_weights)
    assert torch.isfinite(out).all()
    assert torch.all(out[2] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bf16_combination_is_finite_and_close():
    q, k, v, w, masked = make_case("causal", dtype=torch.float32, d=16)
    bias = bias_from(masked).float()
    ref, _ = Paths.dagpam_attention(q, k, v, w, 0.2, 0.2, bias)
    for need_weights in (False, True):
        out, weights = Paths.dagpam_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), w.bfloat16(), 0.2, 0.2, bias.bfloat16(), need_weights=need_weights
        )
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
        if need_weights:
            assert weights.dtype == torch.float32  # softmax and P_G in fp32


def test_dropout_keeps_the_expectation():
    """Independent dropout on the two maps: the mean over many draws approaches P_G V."""
    q, k, v, w, masked = make_case("padding", dtype=torch.float64, B=2, H=2, Tq=4, d=8)
    bias = bias_from(masked)
    exact, _ = Paths.dagpam_attention(q, k, v, w, 0.3, 0.3, bias)
    torch.manual_seed(0)
    for need_weights in (False, True):
        draws = torch.stack([Paths.dagpam_attention(q, k, v, w, 0.3, 0.3, bias, dropout_p=0.3, need_weights=need_weights)[0] for _ in range(3000)])
        assert not torch.allclose(draws[0], exact)
        torch.testing.assert_close(draws.mean(0), exact, atol=0.08, rtol=0)


def test_gradcheck_w_q_neg_and_lambdas():
    q, k, v, w, masked = make_case("causal", B=2, H=2, Tq=3, d=4)
    bias = bias_from(masked)
    w = w.clone().requires_grad_(True)
    lp = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    ln = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    q = q.requires_grad_(True)
    for need_weights in (False, True):
        f = lambda q_, w_, a, b: Paths.dagpam_attention(q_, k, v, w_, a, b, bias, need_weights=need_weights)[0]
        assert torch.autograd.gradcheck(f, (q, w, lp, ln))
