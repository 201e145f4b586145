"""fairseq's memory-saving and regularising training options with daGPAM models:
--checkpoint-activations, --encoder-layerdrop/--decoder-layerdrop, --quant-noise-pq work
(tested against the same model without them); --ddp-backend fully_sharded needs fairscale
and a GPU: without fairscale it stops with fairseq's message naming fairscale, without CUDA
with ours naming the flag, and on a GPU it trains (the one test here that needs a GPU)."""

import importlib.util
import math
import os

import pytest
import torch

from helpers import USER_DIR, build_language_model, build_translation_model
from test_cli import ENV, LM_ARCH, LM_TRAIN, NMT_ARCH, TRAIN, cli, cli_fails, corpus, log_stats  # noqa: F401  (corpus: fixture)

SMALL_NMT = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
             "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--dropout", "0"]


def nmt(extra=()):
    torch.manual_seed(0)
    return build_translation_model("transformer_gpam_iwslt_de_en", SMALL_NMT + ["--gpam-trainable-lambda", *extra], 40, 40)


def batch():
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 40, (3, 9), generator=g)
    src[0, :3] = 1
    return src, torch.tensor([6, 9, 9]), torch.randint(4, 40, (3, 7), generator=g)


def same_weights(reference, model):
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def test_checkpoint_activations_gives_the_same_gradients():
    plain = nmt()
    ckpt = same_weights(plain, nmt(["--checkpoint-activations"]))
    assert all(hasattr(layer, "precheckpoint_forward") for layer in [*ckpt.encoder.layers, *ckpt.decoder.layers])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(*batch())[0].logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert any(".mechanism.lambda_neg_theta" in n for n in grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_layerdrop_drops_gpam_layers_in_training_only():
    plain = nmt().eval()
    dropped = same_weights(plain, nmt(["--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5"]))
    dropped.eval()
    torch.testing.assert_close(dropped(*batch())[0], plain(*batch())[0], atol=0, rtol=0)  # eval: every layer
    dropped.train()
    torch.manual_seed(1)
    outs = [dropped(*batch())[0] for _ in range(8)]
    assert any((o - plain(*batch())[0]).abs().max() > 1e-4 for o in outs)  # train: some layers skipped


def test_layerdrop_language_model_decoder():
    torch.manual_seed(0)
    lm = build_language_model("transformer_lm_gpam", ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--dropout", "0",
                                                      "--decoder-layerdrop", "0.5"], 40)
    assert type(lm.decoder.layers).__name__ == "LayerDropModuleList"
    tokens = batch()[0]
    lm.train()
    torch.manual_seed(1)
    outs = [lm(tokens)[0] for _ in range(8)]
    assert any((o - outs[0]).abs().max() > 1e-4 for o in outs)


def test_quant_noise_pq_reaches_the_attention_projections_in_training_only():
    noisy = nmt(["--quant-noise-pq", "0.5", "--quant-noise-pq-block-size", "8"])
    attn = noisy.encoder.layers[0].self_attn
    assert attn.mechanism.name == "dagpam" and attn.q_proj._forward_pre_hooks  # fairseq's quant_noise hook
    noisy.eval()
    clean = noisy(*batch())[0]
    torch.testing.assert_close(noisy(*batch())[0], clean, atol=0, rtol=0)  # no noise in eval
    noisy.train()  # dropout and layerdrop are 0: only the quantisation noise changes the output
    torch.manual_seed(1)
    assert (noisy(*batch())[0] - clean).abs().max() > 1e-3


def test_all_three_through_fairseq_train(corpus):  # noqa: F811
    out = cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "4",
              "--log-interval", "1", "--no-save", "--disable-validation", "--checkpoint-activations",
              "--encoder-layerdrop", "0.25", "--decoder-layerdrop", "0.25", "--quant-noise-pq", "0.1")
    losses = [float(r["loss"]) for r in log_stats(out, "train_inner")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


HAS_FAIRSCALE = importlib.util.find_spec("fairscale") is not None  # `pip install -e .[test]` installs it
FULLY_SHARDED = ["--ddp-backend", "fully_sharded"]


def test_fully_sharded_without_fairscale_says_what_is_missing(corpus, tmp_path):  # noqa: F811
    # a `fairscale` package that cannot be imported stands in for a machine without fairscale
    os.makedirs(tmp_path / "fairscale")
    (tmp_path / "fairscale" / "__init__.py").write_text('raise ImportError("fairscale hidden by the test")\n')
    env = dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")])))
    err = cli_fails("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "1", "--no-save",
                              *FULLY_SHARDED, env=env)
    assert "Cannot find FullyShardedDataParallel. Please install fairscale with: pip install fairscale" in err


@pytest.fixture(scope="module")
def lm_bin(corpus):  # noqa: F811
    path = os.path.join(corpus["root"], "lm-bin-fsdp")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{corpus['raw']}/train.tgt",
        "--validpref", f"{corpus['raw']}/valid.tgt", "--destdir", path, "--workers", "1")
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU test covers fully_sharded")
@pytest.mark.skipif(not HAS_FAIRSCALE, reason="fairscale is missing: pip install -e .[test]")
@pytest.mark.parametrize("model", ["nmt", "lm"])
def test_fully_sharded_without_cuda_names_the_flag(model, corpus, lm_bin):  # noqa: F811
    # fairscale's FSDP would assert "Torch not compiled with CUDA enabled" deep in its constructor
    if model == "nmt":
        args = [corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN]
    else:
        args = [lm_bin, "--user-dir", USER_DIR, *LM_ARCH, *LM_TRAIN]
    err = cli_fails("fairseq-train", *args, "--max-update", "1", "--no-save", *FULLY_SHARDED)
    last = err.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: --ddp-backend fully_sharded needs a CUDA GPU")
    assert "Torch not compiled with CUDA" not in err


@pytest.mark.skipif(not (HAS_FAIRSCALE and torch.cuda.is_available()), reason="needs a GPU (and fairscale)")
def test_fully_sharded_on_a_gpu(corpus):  # noqa: F811
    out = cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "4",
              "--log-interval", "1", "--no-save", "--disable-validation", *FULLY_SHARDED, "--fp16",
              "--gpam-trainable-lambda", "--checkpoint-activations")
    losses = [float(r["loss"]) for r in log_stats(out, "train_inner")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
