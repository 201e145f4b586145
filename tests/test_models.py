"""The architectures: hyperparameters, options reaching the layers, stock equivalence, overhead."""

import pytest
import torch

from helpers import (
    IWSLT_DE,
    IWSLT_EN,
    WIKI103,
    WMT_JOINED,
    attention_modules,
    build_language_model,
    build_translation_model,
    gpam_parameter_share,
)

SMALL_NMT = [
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--dropout", "0",
]
SMALL_LM = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--dropout", "0"]


# ------------------------------------------------------------------ parameter overhead

PAPER_CONFIGS = {
    # architecture: (builder, extra args, dictionary sizes)
    "transformer_gpam_iwslt_de_en": ("nmt", ["--share-decoder-input-output-embed"], (IWSLT_DE, IWSLT_EN, False)),
    "transformer_gpam_wmt_en_de": ("nmt", ["--share-all-embeddings"], (WMT_JOINED, WMT_JOINED, True)),
    "transformer_lm_gpam_wiki103": ("lm", [], WIKI103),
}
OTHER_CONFIGS = {
    "transformer_gpam": ("nmt", ["--share-all-embeddings"], (WMT_JOINED, WMT_JOINED, True)),
    "transformer_gpam_vaswani_wmt_en_de_big": ("nmt", ["--share-all-embeddings"], (WMT_JOINED, WMT_JOINED, True)),
    "transformer_lm_gpam": ("lm", ["--share-decoder-input-output-embed"], WIKI103),
}


def build_on_meta(arch, kind, extra, sizes):
    with torch.device("meta"):
        if kind == "nmt":
            src, tgt, joined = sizes
            return build_translation_model(arch, extra, src, tgt, joined)
        return build_language_model(arch, extra, vocab=sizes)


# architecture: (attention modules = layers x blocks per layer, head dimension d_h, stock namesake)
OVERHEAD_SHAPES = {
    "transformer_gpam_iwslt_de_en": (6 + 6 * 2, 512 // 4, "transformer_iwslt_de_en"),
    "transformer_gpam_wmt_en_de": (6 + 6 * 2, 512 // 8, "transformer_wmt_en_de"),
    "transformer_lm_gpam_wiki103": (16, 1024 // 8, "transformer_lm_wiki103"),
    "transformer_gpam": (6 + 6 * 2, 512 // 8, "transformer"),
    "transformer_gpam_vaswani_wmt_en_de_big": (6 + 6 * 2, 1024 // 16, "transformer_vaswani_wmt_en_de_big"),
    "transformer_lm_gpam": (6, 512 // 8, "transformer_lm"),
}


@pytest.mark.parametrize("arch", list(PAPER_CONFIGS) + list(OTHER_CONFIGS))
def test_parameter_overhead(arch):
    """daGPAM adds exactly one d_h x d_h W_Q- per attention module to the stock model's parameters."""
    kind, extra, sizes = {**PAPER_CONFIGS, **OTHER_CONFIGS}[arch]
    model = build_on_meta(arch, kind, extra, sizes)
    gpam, total, share = gpam_parameter_share(model)
    print(f"\n{arch}: {gpam:,} daGPAM parameters of {total:,} = {share:.3f} %")
    modules, head_dim, stock_arch = OVERHEAD_SHAPES[arch]
    assert gpam == modules * head_dim * head_dim
    stock = build_on_meta(stock_arch, kind, extra, sizes)
    assert total == sum(p.numel() for p in stock.parameters()) + gpam
    if arch in PAPER_CONFIGS:  # the configurations the paper trained: 0.1 % to 0.84 %
        assert 0.1 <= share <= 0.84


@pytest.mark.parametrize(
    "gpam_arch,stock_arch",
    [
        ("transformer_gpam", "transformer"),
        ("transformer_gpam_iwslt_de_en", "transformer_iwslt_de_en"),
        ("transformer_gpam_wmt_en_de", "transformer_wmt_en_de"),
        ("transformer_gpam_vaswani_wmt_en_de_big", "transformer_vaswani_wmt_en_de_big"),
        ("transformer_lm_gpam", "transformer_lm"),
        ("transformer_lm_gpam_wiki103", "transformer_lm_wiki103"),
    ],
)
def test_architecture_matches_stock_shapes(gpam_arch, stock_arch):
    """--attention-type softmax gives exactly the stock architecture's parameters."""
    kind = "lm" if "_lm" in gpam_arch else "nmt"
    sizes = WIKI103 if kind == "lm" else (IWSLT_DE, IWSLT_EN, False)
    ours = build_on_meta(gpam_arch, kind, ["--attention-type", "softmax"], sizes)
    stock = build_on_meta(stock_arch, kind, [], sizes)
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in stock.named_parameters()}
    layers = ours.decoder.layers
    assert layers[0].normalize_before == stock.decoder.layers[0].normalize_before


def test_pre_ln_through_the_usual_flags():
    model = build_on_meta(
        "transformer_gpam_iwslt_de_en", "nmt", ["--encoder-normalize-before", "--decoder-normalize-before"], (100, 100, False)
    )
    assert model.encoder.layers[0].normalize_before and model.decoder.layers[0].normalize_before
    assert model.encoder.layer_norm is not None


# ------------------------------------------------------------------ equivalence with stock


def copy_weights(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all(".mechanism." in k for k in missing)


def nmt_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 50, (3, 7), generator=g)
    src[0, :2] = 1  # left padding
    prev = torch.randint(4, 50, (3, 6), generator=g)
    prev[:, 0] = 2
    return src, torch.tensor([7, 5, 7]), prev


@pytest.mark.parametrize("attention_type,extra", [("softmax", []), ("dagpam", ["--gpam-lambda-pos", "0", "--gpam-lambda-neg", "0"])])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_translation_model_equals_stock(attention_type, extra, pre_ln):
    ln = ["--encoder-normalize-before", "--decoder-normalize-before"] if pre_ln else []
    torch.manual_seed(0)
    stock = build_translation_model("transformer_iwslt_de_en", SMALL_NMT + ln, 60, 60)
    ours = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT + ln + ["--attention-type", attention_type, *extra], 60, 60)
    copy_weights(stock, ours)
    src, src_len, prev = nmt_batch(stock)
    for train in (True, False):
        stock.train(train)
        ours.train(train)
        a, extra_a = stock(src, src_len, prev)
        b, extra_b = ours(src, src_len, prev)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(extra_b["attn"][0], extra_a["attn"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention_type,extra", [("softmax", []), ("dagpam", ["--gpam-lambda-pos", "0", "--gpam-lambda-neg", "0"])])
def test_language_model_equals_stock(attention_type, extra):
    torch.manual_seed(0)
    stock = build_language_model("transformer_lm", SMALL_LM, vocab=60)
    ours = build_language_model("transformer_lm_gpam", SMALL_LM + ["--attention-type", attention_type, *extra], vocab=60)
    copy_weights(stock, ours)
    tokens = torch.randint(4, 60, (2, 9))
    stock.eval(), ours.eval()
    torch.testing.assert_close(ours(tokens)[0], stock(tokens)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention_type,extra", [("softmax", []), ("dagpam", ["--gpam-lambda-pos", "0", "--gpam-lambda-neg", "0"])])
def test_adaptive_input_language_model_equals_stock(attention_type, extra):
    """transformer_lm_gpam_wiki103 (Pre-LN, adaptive input and adaptive softmax with tied
    weights and projections, no final norm) against stock transformer_lm_wiki103 with the same
    weights: the decoder's features and the adaptive softmax's log-probabilities. Cutoffs and
    sizes shrunk to a 60-word vocabulary."""
    shrink = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
              "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
              "--adaptive-input-cutoff", "20,40", "--adaptive-softmax-cutoff", "20,40"]
    torch.manual_seed(0)
    stock = build_language_model("transformer_lm_wiki103", shrink, vocab=60)
    ours = build_language_model("transformer_lm_gpam_wiki103", shrink + ["--attention-type", attention_type, *extra], vocab=60)
    assert stock.decoder.adaptive_softmax is not None and stock.decoder.layers[0].normalize_before
    assert ours.decoder.adaptive_softmax is not None and ours.decoder.layers[0].normalize_before
    assert {m.name for m in mechanisms(ours).values()} == {attention_type}
    copy_weights(stock, ours)
    tokens = torch.randint(4, 60, (2, 9))
    stock.eval(), ours.eval()
    out_stock, out_ours = stock(tokens), ours(tokens)
    torch.testing.assert_close(out_ours[0], out_stock[0], atol=1e-5, rtol=0)
    lp_stock = stock.get_normalized_probs(out_stock, log_probs=True)
    lp_ours = ours.get_normalized_probs(out_ours, log_probs=True)
    assert lp_ours.shape == (2, 9, 60)
    torch.testing.assert_close(lp_ours, lp_stock, atol=1e-5, rtol=0)


def test_incremental_decoding_of_the_whole_model_equals_full_forward():
    torch.manual_seed(0)
    model = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT, 60, 60).eval()
    src, src_len, prev = nmt_batch(model)
    enc = model.encoder(src, src_len)
    full, _ = model.decoder(prev, encoder_out=enc)
    state, steps = {}, []
    for t in range(prev.size(1)):
        out, _ = model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ options reach the layers


def mechanisms(model):
    return {n: m.mechanism for n, m in attention_modules(model).items()}


def test_nmt_options_reach_every_layer():
    model = build_translation_model(
        "transformer_gpam_iwslt_de_en",
        SMALL_NMT + ["--gpam-blocks", "cross,enc_self", "--gpam-lambda-pos", "0.4", "--gpam-lambda-neg", "0.1",
                     "--gpam-neg-query", "per_head", "--gpam-neg-query-init", "random"],
        60, 60,
    )
    mech = mechanisms(model)
    assert len(mech) == 6
    for name, m in mech.items():
        want = "softmax" if ".self_attn" in name and name.startswith("decoder") else "dagpam"
        assert m.name == want, name
        if want == "dagpam":
            assert m.lambdas() == (0.4, 0.1)
            assert m.w_q_neg.shape == (4, 8, 8)
            assert not torch.allclose(m.w_q_neg, -torch.eye(8))


def test_default_gpam_settings():
    model = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT, 60, 60)
    for m in mechanisms(model).values():
        assert m.name == "dagpam" and m.lambdas() == (0.2, 0.2)
        torch.testing.assert_close(m.w_q_neg.detach(), -torch.eye(8))


def test_lm_options_reach_layers_through_dictconfig():
    """fairseq hands a DictConfig to language models; the options must still arrive."""
    model = build_language_model(
        "transformer_lm_gpam", SMALL_LM + ["--gpam-trainable-lambda", "--gpam-lambda-scope", "head", "--gpam-lambda-pos", "0.5"]
    )
    for m in mechanisms(model).values():
        lp, ln = m.lambdas()
        torch.testing.assert_close(lp.flatten(), torch.full((8,), 0.5))
        torch.testing.assert_close(ln.flatten(), torch.full((8,), 0.2))
    soft = build_language_model("transformer_lm_gpam", SMALL_LM + ["--attention-type", "softmax"])
    assert {m.name for m in mechanisms(soft).values()} == {"softmax"}


def test_models_built_in_sequence_keep_their_own_shapes():
    """fairseq-fixed's TransformerConfig sub-configs are shared class objects; a model
    built after another one must not inherit its shape."""
    with torch.device("meta"):
        big = build_translation_model("transformer_gpam_vaswani_wmt_en_de_big", [], 100, 100)
        small = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT, 100, 100)
        lm = build_language_model("transformer_lm_gpam", SMALL_LM)
        big_again = build_translation_model("transformer_gpam_vaswani_wmt_en_de_big", [], 100, 100)
    assert len(small.encoder.layers) == 2 and small.encoder.layers[0].embed_dim == 32
    assert small.encoder.layers[0].self_attn.num_heads == 4
    assert len(lm.decoder.layers) == 2 and lm.decoder.layers[0].embed_dim == 32
    for model in (big, big_again):
        assert len(model.encoder.layers) == 6 and model.encoder.layers[0].embed_dim == 1024
        assert model.encoder.layers[0].self_attn.num_heads == 16
        assert model.decoder.layers[0].fc1.out_features == 4096
