"""The alternative attentions (diff, coda, nap, unnormalized): math against literal
references, their defining properties, all three roles, incremental decoding, and the CLIs."""

import csv
import math
import os
import re
import sys

import pytest
import torch

from gpam_fairseq.attention import alternatives as Alt
from gpam_fairseq.modules.transformer import build_attention
from gpam_fairseq.options import GPAMConfigError, GPAMOptions
from helpers import REPO, USER_DIR, build_language_model, build_translation_model
from test_cli import GENERATE, NMT_ARCH, TRAIN, cli, corpus  # noqa: F401  (corpus is a fixture)
from test_multihead import E, H, ROLES, T, future_mask, incremental_self_attention, inputs

ALTERNATIVES = ["diff", "coda", "nap", "unnormalized"]
B, TQ, TK, D, NH = 2, 5, 6, 8, 4


def qkv_and_bias(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, t, D, generator=g, dtype=dtype) for t in (TQ, TK, TK))
    bias = torch.zeros(B, 1, TQ, TK, dtype=dtype)
    bias[0, :, :, :2] = float("-inf")  # padding
    bias[1, :, 2:, -1] = float("-inf")  # a query-dependent mask
    bias[1, :, 3, :] = float("-inf")  # one query sees no key at all
    return q, k, v, bias


def keep_of(bias):
    return torch.isfinite(bias).expand(B, NH, TQ, TK)


# ----------------------------------------------------------------------------- literal references


def reference_diff(q, k, v, lam, lambda_init, norm_weight, bias, eps=1e-5):
    """The official multihead_diffattn layout, literally: q, k as (B, T, 2H', d), v as (B, T, H', 2d)."""
    b, h, tq, d = q.shape
    hp = h // 2
    qo = q.transpose(1, 2).reshape(b, tq, 2 * hp, d).transpose(1, 2) * d**-0.5  # (B, 2H', Tq, d)
    ko = k.transpose(1, 2).reshape(b, -1, 2 * hp, d).transpose(1, 2)
    vo = v.transpose(1, 2).reshape(b, -1, hp, 2 * d).transpose(1, 2)  # (B, H', Tk, 2d)
    w = qo @ ko.transpose(-1, -2) + bias
    p = torch.softmax(w, dim=-1).nan_to_num(0.0).view(b, hp, 2, tq, -1)
    attn = (p[:, :, 0] - lam * p[:, :, 1]) @ vo
    attn = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    attn = attn * (1 - lambda_init)
    return attn.transpose(1, 2).reshape(b, tq, h * d)  # what out_proj sees


def reference_coda(q, k, bias):
    d = q.size(-1)
    w = torch.zeros(B, NH, TQ, TK, dtype=q.dtype)
    keep = keep_of(bias)
    for b in range(B):
        for h in range(NH):
            for i in range(TQ):
                for j in range(TK):
                    if keep[b, h, i, j]:
                        e = (q[b, h, i] @ k[b, h, j]) / math.sqrt(d)
                        n = -(q[b, h, i] - k[b, h, j]).abs().sum() / math.sqrt(d)
                        w[b, h, i, j] = torch.tanh(e) * torch.sigmoid(n)
    return w


def reference_nap(q, k, gain, shift, bias, eps=1e-5):
    d = q.size(-1)
    w = torch.zeros(B, NH, TQ, TK, dtype=q.dtype)
    keep = keep_of(bias)
    for b in range(B):
        for h in range(NH):
            for i in range(TQ):
                idx = keep[b, h, i].nonzero().flatten()
                if len(idx) == 0:
                    continue
                s = (k[b, h, idx] @ q[b, h, i]) / math.sqrt(d)
                z = (s - s.mean()) / torch.sqrt(s.var(unbiased=False) + eps)
                w[b, h, i, idx] = gain[h] * z + shift[h]
    return w


def test_diff_equals_official_layout():
    q, k, v, bias = qkv_and_bias()
    g = torch.Generator().manual_seed(3)
    lq1, lk1, lq2, lk2 = (torch.randn(D, generator=g, dtype=torch.float64) * 0.3 for _ in range(4))
    norm_weight = 1 + 0.1 * torch.randn(2 * D, generator=g, dtype=torch.float64)
    lambda_init = Alt.diff_lambda_init(4)
    assert lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    lam = Alt.diff_lambda(lq1, lk1, lq2, lk2, lambda_init)
    assert lam.item() == pytest.approx(math.exp(lq1 @ lk1) - math.exp(lq2 @ lk2) + lambda_init)
    want = reference_diff(q, k, v, lam, lambda_init, norm_weight, bias)
    for need_weights in (False, True):
        out, w = Alt.diff_attention(q, k, v, lam, lambda_init, norm_weight, bias, need_weights=need_weights)
        got = out.permute(0, 2, 1, 3).reshape(B, TQ, NH * D)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # the defining property: every row with an unmasked key sums to 1 - lambda
    sums = w.sum(-1)
    seen = keep_of(bias).any(-1)
    torch.testing.assert_close(sums[seen], torch.full_like(sums[seen], 1 - lam.item()), atol=1e-10, rtol=0)
    assert torch.all(w[~keep_of(bias)] == 0) and torch.all(out[1, :, 3] == 0)
    torch.testing.assert_close(w[:, 0], w[:, 1])  # both heads of a pair carry the pair's map


def test_coda_equals_reference_and_lies_in_open_interval():
    q, k, v, bias = qkv_and_bias()
    q, k = 3 * q, 3 * k  # large scores: tanh near +-1
    want = reference_coda(q, k, bias)
    out, w = Alt.coda_attention(q, k, v, bias, need_weights=True)
    torch.testing.assert_close(w, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, want @ v, atol=1e-12, rtol=0)
    assert w.abs().max() < 0.5 and (w < 0).any() and (w > 0).any()  # in (-1/2, 1/2) within (-1, 1)
    assert torch.all(w[~keep_of(bias)] == 0)


def test_nap_equals_reference_and_rows_are_standardised():
    q, k, v, bias = qkv_and_bias()
    gain = torch.tensor([1.0, 2.0, 0.5, -1.5], dtype=torch.float64)
    shift = torch.tensor([0.0, 0.3, -0.2, 0.1], dtype=torch.float64)
    want = reference_nap(q, k, gain, shift, bias)
    out, w = Alt.nap_attention(q, k, v, gain.view(-1, 1, 1), shift.view(-1, 1, 1), bias, need_weights=True)
    torch.testing.assert_close(w, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, want @ v, atol=1e-12, rtol=0)
    keep = keep_of(bias)
    for b, h, i in [(0, 1, 2), (1, 3, 4), (1, 2, 0)]:
        row = w[b, h, i][keep[b, h, i]]
        assert row.mean().item() == pytest.approx(shift[h].item(), abs=1e-10)
        var = ((k[b, h] @ q[b, h, i]) / math.sqrt(D))[keep[b, h, i]].var(unbiased=False).item()
        want_std = abs(gain[h].item()) * math.sqrt(var / (var + 1e-5))  # |gain|, but for eps
        assert row.std(unbiased=False).item() == pytest.approx(want_std, rel=1e-10)
    assert torch.all(out[1, :, 3] == 0) and torch.all(w[~keep] == 0)


def test_unnormalized_weights_are_the_scaled_scores():
    q, k, v, bias = qkv_and_bias()
    out, w = Alt.unnormalized_attention(q, k, v, bias, need_weights=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    keep = keep_of(bias)
    torch.testing.assert_close(w[keep], scores[keep], atol=1e-12, rtol=0)
    assert torch.all(w[~keep] == 0)
    torch.testing.assert_close(out, w @ v, atol=1e-12, rtol=0)


def test_masked_bias_of_the_encoder_attn_mask_counts_as_masked():
    """fairseq's encoder attn_mask uses -1e8 (fp32) / -1e4 (fp16): masked for every mechanism."""
    q, k, v, bias = qkv_and_bias(torch.float32)
    finite = bias.masked_fill(torch.isinf(bias), -1e8)
    for f in (Alt.coda_weights, Alt.unnormalized_weights):
        torch.testing.assert_close(f(q, k, finite), f(q, k, bias))


# ----------------------------------------------------------------------------- through the fairseq module


def module(role, attention_type, seed=0, **extra):
    torch.manual_seed(seed)
    return build_attention(role, GPAMOptions(attention_type=attention_type), E, H, **{**ROLES[role], **extra}).eval()


@pytest.mark.parametrize("attention_type", ALTERNATIVES)
@pytest.mark.parametrize("role", list(ROLES))
def test_roles_weights_and_fully_masked_rows(attention_type, role):
    ours = module(role, attention_type)
    assert ours.attention_type == attention_type
    args = inputs(role)
    out, none = ours(**args, need_weights=False)
    out_w, w = ours(**args, need_head_weights=True)  # (H, B, Tq, Tk)
    assert none is None and w.shape[:2] == (H, args["query"].size(1))
    torch.testing.assert_close(out_w, out, atol=1e-5, rtol=0)
    kpm = args["key_padding_mask"]
    assert torch.all(w.permute(1, 0, 2, 3)[kpm[:, None, None, :].expand(-1, H, w.size(2), -1)] == 0)

    # a sentence whose keys are all padding: zero attention output, finite gradients
    args = dict(args)
    kpm = kpm.clone()
    kpm[-1] = True
    args["key_padding_mask"] = kpm
    query = args["query"].clone().requires_grad_(True)
    args["query"] = query
    if role != "cross":
        args["key"] = args["value"] = query
    for need_weights in (False, True):
        o, _ = ours(**args, need_weights=need_weights)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o[:, -1], ours.out_proj.bias.expand_as(o[:, -1]), atol=0, rtol=0)
        o.pow(2).sum().backward()
        assert torch.isfinite(query.grad).all()
        query.grad = None


@pytest.mark.parametrize("attention_type", ALTERNATIVES)
def test_incremental_self_attention_equals_causal_forward(attention_type):
    ours = module("dec_self", attention_type)
    x = inputs("dec_self")["query"]
    full, _ = ours(x, x, x, attn_mask=future_mask(T), need_weights=False)
    steps, _ = incremental_self_attention(ours, x)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention_type", ALTERNATIVES)
def test_incremental_and_beamable_cross_attention_equal_full(attention_type):
    ours = module("cross", attention_type)
    args = inputs("cross")
    full, w_full = ours(**args, need_head_weights=True)
    state, outs = {}, []
    for t in range(T):
        o, _ = ours(args["query"][t : t + 1], args["key"], args["value"], key_padding_mask=args["key_padding_mask"],
                    incremental_state=state, static_kv=True, need_weights=False)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=0)

    beam = 2
    q = args["query"].repeat_interleave(beam, dim=1)
    mem = args["key"].repeat_interleave(beam, dim=1)
    kpm = args["key_padding_mask"].repeat_interleave(beam, dim=0)
    plain, w_plain = ours(q, mem, mem, key_padding_mask=kpm, static_kv=True, need_head_weights=True)
    ours.set_beam_size(beam)
    folded, w_folded = ours(q, mem, mem, key_padding_mask=kpm, incremental_state={}, static_kv=True, need_head_weights=True)
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_folded, w_plain, atol=1e-5, rtol=0)


def test_diff_module_rows_sum_to_one_minus_lambda():
    ours = module("enc_self", "diff")
    _, w = ours(**inputs("enc_self"), need_head_weights=True)
    lam = ours.mechanism.lambda_full().item()
    torch.testing.assert_close(w.sum(-1), torch.full_like(w.sum(-1), 1 - lam), atol=1e-5, rtol=0)
    assert (w < 0).any()


def test_diff_lambda_init_follows_depth_and_needs_even_heads():
    lm = build_language_model("transformer_lm_gpam", ["--attention-type", "diff", "--decoder-layers", "3",
                                                      "--decoder-embed-dim", "32", "--decoder-attention-heads", "4"])
    inits = [layer.self_attn.mechanism.lambda_init for layer in lm.decoder.layers]
    assert inits == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * l) for l in range(3)])
    nmt = build_translation_model("transformer_gpam_iwslt_de_en", ["--attention-type", "diff", "--encoder-layers", "2",
                                                                   "--decoder-layers", "2"], src_size=50, tgt_size=50)
    assert [l.self_attn.mechanism.layer_index for l in nmt.encoder.layers] == [1, 2]
    assert [l.encoder_attn.mechanism.layer_index for l in nmt.decoder.layers] == [1, 2]
    with pytest.raises(GPAMConfigError, match="--decoder-attention-heads.*even, got 3"):
        build_language_model("transformer_lm_gpam", ["--attention-type", "diff", "--decoder-embed-dim", "48",
                                                     "--decoder-attention-heads", "3"])


def test_parameters_stay_fp32_under_half():
    for attention_type, names in (("diff", ["lambda_q1", "lambda_k2"]), ("nap", ["gain", "shift"])):
        ours = module("dec_self", attention_type).half()
        assert ours.q_proj.weight.dtype == torch.float16
        assert all(getattr(ours.mechanism, n).dtype == torch.float32 for n in names)
        bf = module("dec_self", attention_type).to(torch.bfloat16)
        out, w = bf(**inputs("dec_self", torch.bfloat16), need_weights=True)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and w.dtype == torch.float32


# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    """One tiny NMT model per alternative, 5 updates each, all other flags identical."""
    root = tmp_path_factory.mktemp("alternatives")
    paths = {}
    for attention_type in ALTERNATIVES:
        save_dir = str(root / attention_type)
        cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "5",
            "--disable-validation", "--attention-type", attention_type, "--save-dir", save_dir)
        paths[attention_type] = os.path.join(save_dir, "checkpoint_last.pt")
    return paths


def test_train_through_the_cli(trained):
    for attention_type, path in trained.items():
        state = torch.load(path, map_location="cpu")  # weights_only, thanks to the plugin's allowlist
        assert state["cfg"]["model"].attention_type == attention_type
        assert state["optimizer_history"][-1]["num_updates"] == 5
        assert any(".mechanism." in k for k in state["model"]) == (attention_type in ("diff", "nap"))


def test_generate_through_the_cli(corpus, trained):  # noqa: F811
    """One fairseq-generate call decodes with all four models (an ensemble: each model runs its
    own incremental decoder, beam search reorders each cache), alignments included."""
    out = cli("fairseq-generate", corpus["bin"], "--user-dir", USER_DIR, "--path", ":".join(trained.values()),
              "--gen-subset", "test", "--print-alignment", *GENERATE)
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 50
    assert re.search(r"^A-\d+\t\d+-\d+", out, re.M)


def test_analyze_collapse_on_the_trained_checkpoints(corpus, trained, tmp_path):  # noqa: F811
    """scripts/analyze_collapse.py (gpam_fairseq/measurement/collapse/) on real checkpoints (loaded through gpam_fairseq/checkpointing/checkpoints.py),
    encoder and decoder stacks, on the valid split."""
    from gpam_fairseq.measurement.collapse.cli import main as analyze_collapse

    prefix = str(tmp_path / "trained")
    analyze_collapse(["--checkpoint", *trained.values(), "--data-bin", corpus["bin"], "--split", "valid",
                           "--batch-size", "4", "--out-prefix", prefix])
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["attention_type"] for r in rows} == set(ALTERNATIVES)
    assert len(rows) == 4 * 2 * 3  # 4 types x (encoder, decoder) x (input + 2 layers)
    grads = [float(r["grad_norm_wq"]) for r in rows if r["layer"] != "0"]
    assert all(math.isfinite(g) and g > 0 for g in grads)
    assert os.path.getsize(prefix + ".png") > 10_000


def test_chunked_l1_distances_match_the_broadcast_reference(monkeypatch):
    """CoDA's L1 distances in query chunks (the H100 illegal-memory-access fix) equal the direct
    (N, Tq, Tk, d) reference, values and gradients, also when the chunks do not divide Tq."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 50, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(3, 40, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = (q[:, :, None, :] - k[:, None, :, :]).abs().sum(-1)
    monkeypatch.setattr(Alt, "CDIST_CHUNK_ELEMENTS", 3 * 40 * 8 * 7)  # 7 query rows a chunk
    out = Alt.l1_distances(q, k)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (q, k), grad), torch.autograd.grad(ref, (q, k), grad)):
        torch.testing.assert_close(a, b)
