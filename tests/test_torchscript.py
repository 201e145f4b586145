"""TorchScript: a daGPAM model and fairseq's SequenceGenerator over it script with torch.jit.script, as
a stock Transformer does (fairseq's own scripting tests script ``SequenceGenerator([model], tgt_dict,
...)``), and the scripted model, whose attention is the explicit reference math, gives the eager
model's outputs: encoder and decoder outputs, attention weights, incremental decoding with beam
search, after a save and a load. Eager attention takes the fused path where no weights are asked
for, so the two agree to float rounding, not bit for bit."""

import io

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from gpam_fairseq.fairseq_glue.tools import build_translation_model

TINY = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--dropout", "0.1", "--attention-dropout", "0.1"]
VARIANTS = {
    "dagpam": [],
    "trainable_per_head": ["--gpam-trainable-lambda", "--gpam-lambda-scope", "head", "--gpam-neg-query", "per_head",
                           "--gpam-neg-query-init", "random", "--gpam-lambda-pos", "0.3", "--gpam-lambda-neg", "0.1"],
    "softmax": ["--attention-type", "softmax"],
}


def model_of(variant):
    torch.manual_seed(7)
    model = build_translation_model("transformer_gpam_iwslt_de_en", TINY + VARIANTS[variant], src_size=40, tgt_size=40)
    with torch.no_grad():  # lambdas away from their init, so that trainable ones matter
        for name, p in model.named_parameters():
            if name.endswith("_theta"):
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def batch(dictionary, bsz=3, src_len=7):
    torch.manual_seed(3)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (bsz, src_len))
    lengths = torch.tensor([src_len, src_len - 2, 3])
    for i, n in enumerate(lengths.tolist()):  # left-padded, as fairseq batches sources
        tokens[i, : src_len - n] = dictionary.pad()
        tokens[i, -1] = dictionary.eos()
    return tokens, lengths


def reloaded(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scripted_model_gives_the_eager_outputs(variant):
    model = model_of(variant)
    scripted = reloaded(torch.jit.script(model))
    src, lengths = batch(model.encoder.dictionary)
    prev = torch.cat([torch.full((3, 1), model.decoder.dictionary.eos()), src[:, :4].clamp(min=4)], dim=1)
    with torch.no_grad():
        enc, enc_s = model.encoder(src, lengths), scripted.encoder(src, lengths)
        torch.testing.assert_close(enc_s["encoder_out"][0], enc["encoder_out"][0], rtol=1e-5, atol=1e-5)
        (logits, extra), (logits_s, extra_s) = model(src, lengths, prev), scripted(src, lengths, prev)
    torch.testing.assert_close(logits_s, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra_s["attn"][0], extra["attn"][0], rtol=1e-5, atol=1e-5)  # the signed cross weights
    assert logits.abs().max() > 0.1  # not trivially equal


@pytest.mark.parametrize("variant", ["dagpam", "trainable_per_head"])
def test_scripted_sequence_generator_gives_the_eager_hypotheses(variant):
    model = model_of(variant)
    tgt_dict = model.decoder.dictionary
    src, lengths = batch(model.encoder.dictionary)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    eager = SequenceGenerator([model], tgt_dict, beam_size=3, max_len_b=8, no_repeat_ngram_size=2)
    scripted = reloaded(torch.jit.script(SequenceGenerator([model], tgt_dict, beam_size=3, max_len_b=8,
                                                           no_repeat_ngram_size=2)))
    with torch.no_grad():
        want, got = eager.forward(sample), scripted.forward(sample)
    assert len(got) == len(want) == 3
    for hyps, hyps_s in zip(want, got):
        assert len(hyps_s) == len(hyps) == 3
        for h, h_s in zip(hyps, hyps_s):
            assert torch.equal(h_s["tokens"], h["tokens"])
            torch.testing.assert_close(h_s["positional_scores"], h["positional_scores"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(h_s["attention"], h["attention"], rtol=1e-4, atol=1e-4)
    assert any(len(h["tokens"]) > 2 for hyps in want for h in hyps)  # real decoding steps, not eos at once


def test_scripted_language_model_decoder_gives_the_eager_outputs():
    """fairseq's language models do not script whole (their forward takes **kwargs, stock too);
    their decoder does, ours as the stock one."""
    from gpam_fairseq.fairseq_glue.tools import build_language_model

    torch.manual_seed(5)
    decoder = build_language_model("transformer_lm_gpam", ["--decoder-layers", "2", "--decoder-embed-dim", "16",
                                                           "--decoder-ffn-embed-dim", "16", "--decoder-attention-heads",
                                                           "2", "--gpam-trainable-lambda"], vocab=30).decoder.eval()
    scripted = reloaded(torch.jit.script(decoder))
    tokens = torch.randint(4, 30, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(scripted(tokens)[0], decoder(tokens)[0], rtol=1e-5, atol=1e-5)


def test_a_mechanism_without_a_scripted_path_says_so_when_called():
    torch.manual_seed(1)
    model = build_translation_model("transformer_gpam_iwslt_de_en", TINY + ["--attention-type", "coda"], src_size=40,
                                    tgt_size=40).eval()
    scripted = torch.jit.script(model)
    src, lengths = batch(model.encoder.dictionary)
    with pytest.raises(Exception, match="this --attention-type has no TorchScript path"):
        scripted(src, lengths, src)
