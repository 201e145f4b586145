"""Stock softmax checkpoints into GPAM models: the shared weights load, the GPAM-only
parameters get their documented init, nothing else is skipped, and with lambda+ = lambda- = 0
the fine-tuned model starts exactly where the stock one was (first loss through fairseq-train)."""

import os

import pytest
import torch
import torch.nn.functional as F

from helpers import build_language_model, build_translation_model
from test_cli import NMT_ARCH, TRAIN, cli, corpus, log_stats  # noqa: F401  (corpus: fixture)
from helpers import USER_DIR

SMALL_NMT = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
             "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--dropout", "0"]
SMALL_LM = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--dropout", "0"]
LAMBDA_ZERO = ["--gpam-lambda-pos", "0", "--gpam-lambda-neg", "0"]


def nmt_pair(extra, stock_extra=()):
    torch.manual_seed(0)
    stock = build_translation_model("transformer_iwslt_de_en", SMALL_NMT + list(stock_extra), 60, 60)
    ours = build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT + list(stock_extra) + list(extra), 60, 60)
    return stock.eval(), ours.eval()


def nmt_outputs(model):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 60, (3, 7), generator=g)
    src[0, :2] = 1  # left padding
    prev = torch.randint(4, 60, (3, 6), generator=g)
    return model(src, torch.tensor([5, 7, 7]), prev)[0]


def mechanisms(model):
    return [m for n, m in model.named_modules() if n.endswith(".mechanism")]


def test_stock_nmt_weights_load_strictly_and_reproduce_stock_with_lambda_zero():
    stock, ours = nmt_pair(LAMBDA_ZERO)
    ours.load_state_dict(stock.state_dict(), strict=True)  # fairseq's own load path (upgrade + strict)
    mechs = mechanisms(ours)
    assert len(mechs) == 6 and all(m.name == "dagpam" for m in mechs)
    for m in mechs:  # documented init: W_Q- = -I (--gpam-neg-query-init neg_identity)
        torch.testing.assert_close(m.w_q_neg, -torch.eye(m.head_dim), atol=0, rtol=0)
    torch.testing.assert_close(nmt_outputs(ours), nmt_outputs(stock), atol=1e-5, rtol=0)
    # the default lambdas are not the softmax model: the loaded weights are really used by daGPAM
    _, dagpam = nmt_pair([])
    dagpam.load_state_dict(stock.state_dict(), strict=True)
    assert (nmt_outputs(dagpam) - nmt_outputs(stock)).abs().max() > 1e-4


def test_trainable_lambda_starts_at_the_flags_and_stays_within_the_bound():
    eps = 1e-3
    stock, ours = nmt_pair(["--gpam-trainable-lambda", "--gpam-lambda-pos", str(eps), "--gpam-lambda-neg", str(eps)])
    ours.load_state_dict(stock.state_dict(), strict=True)
    for m in mechanisms(ours):
        pos, neg = m.lambdas()
        torch.testing.assert_close(pos.flatten(), torch.tensor([eps]), atol=1e-9, rtol=0)
        torch.testing.assert_close(neg.flatten(), torch.tensor([eps]), atol=1e-9, rtol=0)
    # |P_G - P+| sums to at most lambda+ + lambda- per row: the model starts O(eps) from stock
    diff = (F.log_softmax(nmt_outputs(ours), -1) - F.log_softmax(nmt_outputs(stock), -1)).abs().max()
    assert 0 < diff < 0.05


def test_which_init_learns_the_negative_map():
    """Fixed lambda = 0 reproduces stock but never trains W_Q- (its gradient is exactly 0);
    trainable lambda started small gets gradients for W_Q- and both thetas from the first step."""
    for extra, learns in ((LAMBDA_ZERO, False), (["--gpam-trainable-lambda", "--gpam-lambda-pos", "0.01", "--gpam-lambda-neg", "0.01"], True)):
        stock, ours = nmt_pair(extra)
        ours.load_state_dict(stock.state_dict(), strict=True)
        ours.train()
        nmt_outputs(ours).logsumexp(-1).sum().backward()
        grads = {n: p.grad for n, p in ours.named_parameters() if ".mechanism." in n}
        assert all(g is not None for g in grads.values())
        assert all(bool(g.abs().max() > 0) == learns for g in grads.values()), extra
        if learns:
            assert any(n.endswith("lambda_neg_theta") for n in grads)


def test_stock_lm_weights_load_and_reproduce_stock_with_lambda_zero():
    torch.manual_seed(0)
    stock = build_language_model("transformer_lm", SMALL_LM, vocab=60).eval()
    ours = build_language_model("transformer_lm_gpam", SMALL_LM + LAMBDA_ZERO, vocab=60).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    tokens = torch.randint(4, 60, (2, 9))
    torch.testing.assert_close(ours(tokens)[0], stock(tokens)[0], atol=1e-5, rtol=0)


def test_only_gpam_parameters_are_filled_in():
    stock, ours = nmt_pair(LAMBDA_ZERO)
    missing = dict(stock.state_dict())
    del missing["decoder.layers.1.fc2.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*decoder\.layers\.1\.fc2\.weight"):
        ours.load_state_dict(missing, strict=True)
    extra = dict(stock.state_dict())
    extra["encoder.layers.0.self_attn.stray.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*stray"):
        ours.load_state_dict(extra, strict=True)
    # a daGPAM checkpoint into a softmax model: its W_Q- are unexpected, never dropped silently
    _, softmax = nmt_pair(["--attention-type", "softmax"])
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*mechanism\.w_q_neg"):
        softmax.load_state_dict(ours.state_dict(), strict=True)


def test_a_checkpoints_own_gpam_parameters_are_kept():
    _, src = nmt_pair(["--gpam-neg-query-init", "random"])
    _, dst = nmt_pair([])
    dst.load_state_dict(src.state_dict(), strict=True)
    for a, b in zip(mechanisms(src), mechanisms(dst)):
        torch.testing.assert_close(b.w_q_neg, a.w_q_neg, atol=0, rtol=0)


# ------------------------------------------------------------------ through fairseq-train

STOCK_ARCH = ["--arch", "transformer_iwslt_de_en"] + NMT_ARCH[2:]
GPAM_ARCH = NMT_ARCH
ONE_STEP = ["--dropout", "0", "--log-interval", "1", "--disable-validation"]


@pytest.fixture(scope="module")
def stock_checkpoint(corpus):  # noqa: F811
    save_dir = os.path.join(corpus["root"], "ft_stock")
    cli("fairseq-train", corpus["bin"], *STOCK_ARCH, *TRAIN, *ONE_STEP, "--max-update", "3", "--save-dir", save_dir)
    return os.path.join(save_dir, "checkpoint_last.pt")


def first_loss(output):
    records = log_stats(output, "train_inner")
    assert records and int(records[0]["num_updates"]) == 1
    return float(records[0]["loss"])


def train(corpus, arch, tmp_path, name, *extra):  # noqa: F811
    return cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *arch, *TRAIN, *ONE_STEP,
               "--save-dir", str(tmp_path / name), *extra)


def test_finetune_from_stock_checkpoint_first_loss_equals_stock(corpus, stock_checkpoint, tmp_path):  # noqa: F811
    stock = train(corpus, STOCK_ARCH, tmp_path, "stock", "--finetune-from-model", stock_checkpoint, "--max-update", "1", "--no-save")
    ours = train(corpus, GPAM_ARCH, tmp_path, "ours", "--finetune-from-model", stock_checkpoint, "--max-update", "1",
                 "--no-save", *LAMBDA_ZERO)
    assert "initialised as a fresh model" in ours  # the GPAM-only parameters are announced, not silent
    # losses are logged with 3 decimals; the two models agree to ~1e-6 (test above)
    assert abs(first_loss(ours) - first_loss(stock)) <= 1e-3
    # --restore-file with the reset flags: the same start
    restored = train(corpus, GPAM_ARCH, tmp_path, "restored", "--restore-file", stock_checkpoint, "--reset-optimizer",
                     "--reset-lr-scheduler", "--reset-meters", "--reset-dataloader", "--max-update", "1", "--no-save",
                     *LAMBDA_ZERO)
    assert abs(first_loss(restored) - first_loss(stock)) <= 1e-3


