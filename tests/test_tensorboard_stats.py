"""daGPAM scalars next to fairseq's own: in the logs and the tensorboard event files, correct,
per block kind or per layer, on the --gpam-stats-interval schedule, and free where they must be."""

import glob
import os

import pytest
import torch

from fairseq.logging import metrics

from gpam_fairseq.attention.stats import AttentionStats, label_of
from gpam_fairseq.options import GPAMConfigError
from helpers import USER_DIR, build_language_model, build_translation_model
from test_cli import NMT_ARCH, TRAIN, cli, corpus  # noqa: F401  (corpus: fixture)

SMALL_NMT = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
             "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64"]
SCALARS = ("neg_share", "row_sum", "lambda_pos", "lambda_neg")


def scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tb_run(corpus):  # noqa: F811
    tb = os.path.join(corpus["root"], "tb_stats")
    cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "6", "--log-interval", "2",
        "--gpam-trainable-lambda", "--gpam-lambda-pos", "0.3", "--gpam-lambda-neg", "0.1", "--gpam-stats-interval", "1",
        "--no-save", "--tensorboard-logdir", tb)
    return tb


@pytest.mark.parametrize("split", ["train_inner", "train", "valid"])
def test_event_files_hold_the_gpam_scalars_next_to_fairseqs(tb_run, split):
    assert glob.glob(os.path.join(tb_run, split, "events.out.tfevents.*"))
    found = scalars(os.path.join(tb_run, split))
    assert "loss" in found
    for block in ("enc_self", "dec_self", "cross"):
        series = {name: found[f"gpam/{block}/{name}"] for name in SCALARS}
        for (step, pos), (_, neg), (_, row_sum), (_, share) in zip(
            series["lambda_pos"], series["lambda_neg"], series["row_sum"], series["neg_share"]
        ):
            assert abs(pos - 0.3) < 0.05 and abs(neg - 0.1) < 0.05  # trainable, started at the flags
            assert abs(row_sum - (1 + pos - neg)) < 2e-3  # logged with 4 decimals, averaged over layers
            assert 0 <= share < 0.5
        if split == "train_inner":
            assert [s for s, _ in series["neg_share"]] == [2, 4, 6]


# ------------------------------------------------------------------ in-process


def logged(model, *inputs):
    with metrics.aggregate() as agg:  # a fresh aggregator, as fairseq-train opens "train"/"train_inner"
        model(*inputs)
    return agg.get_smoothed_values()


def nmt(extra=(), seed=0):
    torch.manual_seed(seed)
    return build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT + list(extra), 40, 40)


def batch():
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 40, (2, 9), generator=g)
    src[0, :3] = 1
    return src, torch.tensor([6, 9]), torch.randint(4, 40, (2, 7), generator=g)


def test_values_match_the_weights_of_the_mechanism():
    model = nmt(["--gpam-lambda-pos", "0.8", "--gpam-lambda-neg", "0.5", "--gpam-stats-per-layer"]).eval()
    attn = model.decoder.layers[1].encoder_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(20)  # sharper maps than at init, so that some weights are negative
    values = logged(model, *batch())
    assert set(values) == {f"gpam/{w}/{s}" for w in ("enc0_self", "enc1_self", "dec0_self", "dec1_self", "dec0_cross",
                                                       "dec1_cross") for s in ("neg_share", "row_sum")}
    assert all(abs(v - 1.3) < 1e-4 for k, v in values.items() if k.endswith("row_sum"))
    # the share of negative mass, from the weights fairseq itself gets back (need_weights)
    src, src_len, prev = batch()
    enc = model.encoder(src, src_len)
    x = model.decoder.embed_tokens(prev).transpose(0, 1)  # any query works: compare the sentence's own map
    with torch.no_grad():
        _, w = attn(x, enc["encoder_out"][0], enc["encoder_out"][0], key_padding_mask=enc["encoder_padding_mask"][0],
                    need_weights=True, need_head_weights=True)
    from gpam_fairseq.attention.masks import Mask
    from gpam_fairseq.attention.stats import AttentionStats

    q = attn._split_heads(attn.q_proj(x), 2)
    k = attn._split_heads(attn.k_proj(enc["encoder_out"][0]), 2)
    bias = Mask.from_parts(None, enc["encoder_padding_mask"][0], q.dtype).bias
    names, vals = AttentionStats.compute(attn.mechanism, q, k, bias)
    w0 = w[:, 0]  # (H, Tq, Tk) of the first sentence: the stats subsample (all 7 queries < 16)
    expected = (-w0).clamp(min=0).sum() / w0.abs().sum()
    torch.testing.assert_close(vals[names.index("neg_share")], expected, atol=1e-6, rtol=0)
    assert expected > 0  # the test data really has negative weights


def test_interval_and_only_inside_fairseq_loops():
    model = nmt(["--gpam-stats-interval", "3"]).train()
    seen = []
    for update in range(7):
        model.set_num_updates(update)
        seen.append(bool(logged(model, *batch())))
    assert seen == [True, False, False, True, False, False, True]
    model.set_num_updates(6)  # once per update, even with --update-freq > 1
    with metrics.aggregate() as agg:
        model(*batch())
        model(*batch())
    assert "gpam/enc_self/neg_share" not in agg  # already logged at update 6 above
    with metrics.aggregate() as agg:
        model.set_num_updates(9)
        model(*batch())
        model(*batch())
    assert agg["gpam/enc_self/neg_share"].count == 2  # the two encoder layers, once
    # outside fairseq-train (generation, hub, plain forward) only the "default" aggregator is active
    model.set_num_updates(12)
    before = dict(metrics.get_smoothed_values("default"))
    model(*batch())
    assert metrics.get_smoothed_values("default") == before


def test_no_effect_on_outputs_or_rng():
    outs = []
    for interval in ("0", "1"):
        model = nmt(["--dropout", "0.3", "--attention-dropout", "0.2", "--gpam-stats-interval", interval]).train()
        torch.manual_seed(7)
        with metrics.aggregate():
            outs.append((model(*batch())[0], torch.rand(3)))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=0, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=0, rtol=0)


def test_nothing_attached_without_a_negative_map_or_when_off():
    for model in (nmt(["--attention-type", "softmax"]), nmt(["--gpam-blocks", "cross"]), nmt(["--gpam-stats-interval", "0"]),
                  build_language_model("transformer_lm_gpam", ["--decoder-layers", "1", "--attention-type", "softmax"], 40)):
        attached = {n for n, m in model.named_modules() if any(isinstance(o, AttentionStats) for o in getattr(m, "observers", ()))}
        assert all(n.endswith("encoder_attn") for n in attached)
        assert not logged(model, *(batch() if hasattr(model, "encoder") else (batch()[0],))).keys() - {
            "gpam/cross/neg_share", "gpam/cross/row_sum"}


def test_language_model_and_labels():
    model = build_language_model("transformer_lm_gpam", ["--decoder-layers", "2", "--decoder-embed-dim", "32",
                                                         "--gpam-trainable-lambda", "--gpam-lambda-scope", "head"], 40)
    values = logged(model.train(), batch()[0])
    assert set(values) == {f"gpam/dec_self/{s}" for s in SCALARS}
    assert label_of("decoder._fsdp_wrapped_module.layers.3.self_attn", True) == "dec3_self"
    assert label_of("decoder.layers.3.encoder_attn", False) == "cross"


def test_bad_interval_names_the_flag():
    with pytest.raises(GPAMConfigError, match="--gpam-stats-interval: expected an integer >= 0"):
        nmt(["--gpam-stats-interval", "-1"])


def test_row_sum_ignores_fully_masked_rows_and_is_nan_without_any_key():
    """The scalars of one module on a hand-made batch: the mean row sum counts only rows with an
    unmasked key (computed without boolean indexing, i.e. without a host sync on GPUs)."""
    from gpam_fairseq.attention import functional
    from gpam_fairseq.attention.mechanisms import build_mechanism
    from gpam_fairseq.attention.masks import Mask
    from gpam_fairseq.attention.stats import AttentionStats
    from gpam_fairseq.options import GPAMOptions

    mechanism = build_mechanism("dagpam", 2, 4, GPAMOptions(lambda_pos=0.3, lambda_neg=0.1))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, generator=gen), torch.randn(1, 2, 6, 4, generator=gen)
    bias = torch.zeros(1, 1, 5, 6)
    bias[..., 1, :] = float("-inf")  # query row 1 sees no key
    bias[..., 3:, 4:] = float("-inf")  # some padding
    names, values = AttentionStats.compute(mechanism, q, k, bias)
    stats = dict(zip(names, values.tolist()))
    assert stats["row_sum"] == pytest.approx(1.3 - 0.1, abs=1e-6)
    p_g = functional.dagpam_weights(q, k, mechanism.w_q_neg, 0.3, 0.1, bias)[0]
    assert stats["neg_share"] == pytest.approx(((-p_g).clamp(min=0).sum() / p_g.abs().sum()).item(), rel=1e-5)
    names, values = AttentionStats.compute(mechanism, q, k, torch.full((1, 1, 5, 6), float("-inf")))
    assert torch.isnan(values[names.index("row_sum")])
