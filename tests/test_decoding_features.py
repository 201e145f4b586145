"""Decoding with daGPAM models: alignments from signed weights (--print-alignment hard/soft),
sampling (--sampling --sampling-topk, CLI and hub), LM sample() through the hub, and
--replace-unk, which fairseq-fixed 0.12.3.1 breaks for every model (the failure is asserted)."""

import os
import re


import numpy as np
import pytest
import torch

from helpers import USER_DIR
from test_cli import LM_ARCH, LM_TRAIN, NMT_ARCH, TRAIN, cli, corpus  # noqa: F401  (corpus: fixture)

GEN = ["--batch-size", "32", "--required-batch-size-multiple", "1", "--gen-subset", "test"]


@pytest.fixture(scope="module")
def nmt(corpus):  # noqa: F811
    save_dir = os.path.join(corpus["root"], "dec_nmt")
    # a large lambda-, so that this short run already has negative weights (rows then sum to 0.5)
    cli("fairseq-train", corpus["bin"], "--user-dir", USER_DIR, *NMT_ARCH, *TRAIN, "--max-update", "40", "--disable-validation",
        "--gpam-lambda-pos", "0.5", "--gpam-lambda-neg", "1.0", "--save-dir", save_dir)
    return os.path.join(save_dir, "checkpoint_last.pt")


def by_id(out, tag):
    return {int(m.group(1)): m.group(2) for m in re.finditer(rf"^{tag}-(\d+)\t(.*)$", out, re.M)}


def test_sampling_and_alignment_from_the_signed_weights(corpus, nmt):  # noqa: F811
    """--sampling --sampling-topk through fairseq-generate, with the alignments of the sampled
    hypotheses: soft = the signed weights of the alignment layer, hard = their argmax."""
    runs = {
        kind: cli("fairseq-generate", corpus["bin"], "--user-dir", USER_DIR, "--path", nmt, *GEN, "--beam", "1", "--nbest", "1",
                  "--sampling", "--sampling-topk", "5", "--seed", "3", "--print-alignment", kind)
        for kind in ("soft", "hard")
    }
    soft, hard = runs["soft"], runs["hard"]
    soft_rows, hard_pairs, src = by_id(soft, "A"), by_id(hard, "A"), by_id(hard, "S")
    hyps = by_id(hard, "H")
    assert len(hyps) == 50 and all(h.split("\t")[1].strip() for h in hyps.values())
    assert by_id(soft, "H") == hyps and len(soft_rows) == 50  # sampling is reproducible with --seed
    negative = 0
    for i, text in soft_rows.items():
        # one row per target token (its eos included), one weight per source token and the source eos
        rows = [[float(x) for x in row.split(",")] for row in text.split()]
        n_src = len(src[i].split()) + 1
        for row in rows:
            assert len(row) == n_src
            assert abs(sum(row) - 0.5) < 1e-4  # 1 + lambda+ - lambda-
            assert min(row) >= -1.0 - 1e-6 and max(row) <= 1.5 + 1e-6  # [-lambda-, 1 + lambda+]
            negative += sum(x < 0 for x in row)
        # hard alignment: for each target word, the source word (eos excluded) of the largest signed weight
        pairs = [tuple(int(x) for x in p.split("-")) for p in hard_pairs[i].split()]
        assert [t for _, t in pairs] == list(range(len(rows) - 1))
        for s, t in pairs:
            assert s == max(range(n_src - 1), key=lambda j: rows[t][j])
    assert negative > 0  # the printed weights really are signed


def test_sampling_through_the_hub(corpus, nmt):  # noqa: F811
    from gpam_fairseq.models.transformer_gpam import TransformerGPAMModel

    hub = TransformerGPAMModel.from_pretrained(os.path.dirname(nmt), checkpoint_file=os.path.basename(nmt),
                                               data_name_or_path=corpus["bin"], source_lang="src", target_lang="tgt")
    with open(os.path.join(corpus["raw"], "test.src")) as f:
        sentences = [next(f).strip() for _ in range(8)]
    greedy = hub.translate(sentences, beam=1)
    torch.manual_seed(0)
    assert hub.translate(sentences, beam=1, sampling=True, sampling_topk=1) == greedy  # top-1 sampling is greedy
    samples = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        samples.append(hub.translate(sentences, beam=1, sampling=True, sampling_topk=5, temperature=2.0))
    assert samples[0] != samples[1]


@pytest.fixture(scope="module")
def lm(corpus):  # noqa: F811
    lm_bin = os.path.join(corpus["root"], "dec_lm_bin")
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{corpus['raw']}/train.tgt", "--validpref",
        f"{corpus['raw']}/valid.tgt", "--destdir", lm_bin, "--workers", "1")
    save_dir = os.path.join(corpus["root"], "dec_lm")
    cli("fairseq-train", lm_bin, "--user-dir", USER_DIR, *LM_ARCH, *LM_TRAIN, "--max-update", "20", "--disable-validation",
        "--save-dir", save_dir)
    from gpam_fairseq.models.transformer_lm_gpam import TransformerLanguageModelGPAM

    return TransformerLanguageModelGPAM.from_pretrained(save_dir, checkpoint_file="checkpoint_last.pt", data_name_or_path=lm_bin)


def test_plugin_restores_the_numpy_name_fairseq_fixed_needs():
    """fairseq-fixed 0.12.3.1's TokenBlockDataset (break mode eos: every LM hub's sample/generate/
    score) calls np.compat.long, which NumPy 2 removed; importing the plugin gives it back."""
    import gpam_fairseq  # noqa: F401

    assert np.dtype(np.compat.long) == np.dtype(np.int64)


def test_lm_sample_through_the_hub(lm):
    prompt = " ".join(lm.task.source_dictionary[i] for i in range(4, 7))
    torch.manual_seed(0)
    sampled = lm.sample(prompt, beam=1, sampling=True, sampling_topk=5, min_len=6, max_len_b=12)
    assert sampled.startswith(prompt) and len(sampled.split()) > 3
    torch.manual_seed(0)
    assert lm.sample(prompt, beam=1, sampling=True, sampling_topk=1, max_len_b=12) == lm.sample(prompt, beam=1, max_len_b=12)
    # greedy generation (incremental decoding through the daGPAM cache) follows the argmax of
    # a full forward pass over the generated text, token by token (the hub decodes after an eos
    # as beginning of sentence; min_len forbids eos before the last token)
    greedy = lm.generate([lm.encode(prompt)], beam=1, min_len=6, max_len_b=12)[0][0]["tokens"]
    eos = lm.task.source_dictionary.eos()
    model = lm.models[0]  # already in eval mode (the hub made it generation-only)
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor([eos]), greedy[:-1]]).unsqueeze(0))[0][0]
    n_prompt = 3
    generated = logits[n_prompt:-1]
    generated[:, eos] = float("-inf")
    assert len(generated) >= 3 and torch.equal(generated.argmax(-1), greedy[n_prompt:-1])


def test_replace_unk_is_broken_in_fairseq_fixed_for_every_model():
    """fairseq-fixed 0.12.3.1: hard alignments are (src, tgt) pairs but utils.replace_unk, which
    fairseq-generate and fairseq-interactive call for --replace-unk, indexes the source words with
    them (TypeError) whatever the model; fairseq-generate accepts --replace-unk only with
    --dataset-impl raw, and a bare --replace-unk is read as a lexicon file named '@@ '.
    When fairseq fixes this, this test fails: then test the replaced words end to end."""
    from fairseq import utils

    alignment = utils.extract_hard_alignment(torch.tensor([[0.2, 0.9, -0.1]]), torch.tensor([5, 6, 2]), torch.tensor([7]), 1, 2)
    assert alignment == [(1, 0)]  # target word 0 -> source word 1, the largest signed weight
    with pytest.raises(TypeError, match="list indices must be integers or slices, not tuple"):
        utils.replace_unk("<unk>", "a b", alignment, {}, "<unk>")
