"""What every level of the benchmark measures: the settings, their models and random batches.

A :class:`Shape` is one of the paper's setups (``FULL_SHAPES``: ``iwslt``, ``wmt_big``, ``lm512``,
``lm3072``) or its tiny ``--quick`` version (``QUICK_SHAPES``). :func:`build_model` builds the
stock or daGPAM model fairseq-train would build for it, with a dictionary of the real size;
:func:`training_loss` gives the loss of one batch of random tokens, left-padded sources and
right-padded targets as fairseq pads them; the masks are fairseq's own (:func:`left_padding`,
:func:`future_mask`).
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from gpam_fairseq.fairseq_glue.tools import IWSLT_DE, WIKI103, WMT_JOINED
from gpam_fairseq.fairseq_glue.tools import build_language_model, build_translation_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LEVELS = ("ops", "core", "attention", "train", "beam")
BEAM = 5


@dataclass(frozen=True)
class Shape:
    """One benchmark setting. ``tokens`` = batch * length; NMT batches are padded."""

    name: str
    batch: int
    length: int
    embed_dim: int
    heads: int
    causal: bool
    # whole-model levels: stock architecture, ours, dictionary size, extra architecture flags
    stock_arch: str
    gpam_arch: str
    vocab: int
    arch_flags: tuple = ()
    beam_sentences: int = 0  # 0: no beam-search level (language models)
    beam_length: int = 0
    joined: bool = False  # one dictionary for both languages (WMT)

    @property
    def is_lm(self) -> bool:
        return self.beam_sentences == 0


# Real sizes: the paper's setups, with the dictionaries fairseq's recipes produce.
FULL_SHAPES = (
    Shape("iwslt", 128, 32, 512, 4, False, "transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en",
          IWSLT_DE, ("--share-decoder-input-output-embed",), beam_sentences=128, beam_length=32),
    Shape("wmt_big", 112, 32, 1024, 16, False, "transformer_vaswani_wmt_en_de_big",
          "transformer_gpam_vaswani_wmt_en_de_big", WMT_JOINED, ("--share-all-embeddings",),
          beam_sentences=128, beam_length=32, joined=True),
    Shape("lm512", 4, 512, 1024, 8, True, "transformer_lm", "transformer_lm_gpam", WIKI103,
          ("--share-decoder-input-output-embed",)),
    Shape("lm3072", 1, 3072, 1024, 8, True, "transformer_lm", "transformer_lm_gpam", WIKI103,
          ("--share-decoder-input-output-embed",)),
)

# --quick: the same four settings shrunk until the whole run takes seconds on a CPU.
_TINY = ("--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
         "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "4", "--decoder-attention-heads", "4")
_TINY_LM = ("--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "4")
QUICK_SHAPES = (
    Shape("iwslt", 4, 12, 32, 4, False, "transformer_iwslt_de_en", "transformer_gpam_iwslt_de_en",
          60, ("--share-decoder-input-output-embed",) + _TINY, beam_sentences=3, beam_length=5),
    Shape("wmt_big", 4, 12, 64, 16, False, "transformer_vaswani_wmt_en_de_big",
          "transformer_gpam_vaswani_wmt_en_de_big", 60, ("--share-all-embeddings",) + _TINY,
          beam_sentences=3, beam_length=5, joined=True),
    Shape("lm512", 2, 16, 64, 8, True, "transformer_lm", "transformer_lm_gpam", 60,
          ("--share-decoder-input-output-embed",) + _TINY_LM),
    Shape("lm3072", 1, 48, 64, 8, True, "transformer_lm", "transformer_lm_gpam", 60,
          ("--share-decoder-input-output-embed",) + _TINY_LM),
)


def mechanism_names() -> List[str]:
    """Every attention type registered at run time, softmax first."""
    from gpam_fairseq.attention.mechanisms import MECHANISMS

    return sorted(MECHANISMS, key=lambda n: (n != "softmax", n != "dagpam", n))


def padded_lengths(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sentence lengths between half and all of ``length``; the longest is ``length``."""
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
    lengths[0] = length
    return lengths


def left_padding(batch: int, length: int, gen: torch.Generator, device) -> torch.Tensor:
    """fairseq's source-side padding mask (True = pad, on the left) for random lengths."""
    return (torch.arange(length).unsqueeze(0) < (length - padded_lengths(batch, length, gen)).unsqueeze(1)).to(device)


def future_mask(t: int, dtype: torch.dtype, device) -> torch.Tensor:
    """fairseq's decoder mask: float -inf above the diagonal, recorded as such by our
    decoder (which the module needs to take the fused kernel's causal path)."""
    from gpam_fairseq.attention.multihead import mark_causal

    return mark_causal(torch.triu(torch.full((t, t), float("-inf"), dtype=dtype, device=device), 1))


def build_model(shape: Shape, arch: str, extra: Sequence[str] = ()):
    """(model, dictionary) as fairseq-train builds it, with a dictionary of the real size."""
    flags = [*shape.arch_flags, *extra]
    if shape.is_lm:
        model = build_language_model(arch, ["--tokens-per-sample", str(shape.length), *flags], vocab=shape.vocab)
        return model, model.decoder.dictionary
    model = build_translation_model(arch, flags, src_size=shape.vocab, tgt_size=shape.vocab, joined=shape.joined)
    return model, model.decoder.dictionary


# The ops level measures daGPAM both ways: keeping its fused attention's tensors for the
# backward pass, and recomputing them there (--gpam-recompute-attention).
RECOMPUTED = "dagpam-recompute"


def variant_flags(variant: str) -> tuple:
    """The flags of a variant of the ops level: an attention type, or daGPAM recomputed."""
    if variant == RECOMPUTED:
        return ("--attention-type", "dagpam", "--gpam-recompute-attention")
    return ("--attention-type", variant)


def model_arms(shape: Shape, types: Sequence[str]) -> List[Tuple[str, str, tuple]]:
    """(variant name, architecture, extra flags): stock first, then each attention type."""
    return [("stock", shape.stock_arch, ())] + [(n, shape.gpam_arch, variant_flags(n)) for n in types]


def nmt_batch(batch: int, length: int, dictionary, device, gen: torch.Generator):
    """Left-padded sources, right-padded targets (fairseq's defaults) of random tokens."""
    pad, eos, low = dictionary.pad(), dictionary.eos(), dictionary.nspecial
    src_len, tgt_len = padded_lengths(batch, length, gen), padded_lengths(batch, length, gen)
    src = torch.full((batch, length), pad, dtype=torch.long)
    tgt = torch.full((batch, length), pad, dtype=torch.long)
    prev = torch.full((batch, length), pad, dtype=torch.long)
    for i in range(batch):
        s, t = int(src_len[i]), int(tgt_len[i])
        src[i, length - s:] = torch.randint(low, len(dictionary), (s,), generator=gen)
        src[i, -1] = eos
        tgt[i, :t] = torch.randint(low, len(dictionary), (t,), generator=gen)
        tgt[i, t - 1] = eos
        prev[i, 0] = eos
        prev[i, 1:t] = tgt[i, : t - 1]
    return src.to(device), src_len.to(device), prev.to(device), tgt.to(device)


def training_loss(model, shape: Shape, batch: int, length: int, dictionary, device, gen):
    """(loss function of the model, words per call) for one batch of random tokens."""
    pad = dictionary.pad()
    if shape.is_lm:
        tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length + 1), generator=gen).to(device)
        src, tgt = tokens[:, :-1], tokens[:, 1:]
        forward = lambda: model(src)[0]
    else:
        src, src_len, prev, tgt = nmt_batch(batch, length, dictionary, device, gen)
        forward = lambda: model(src, src_len, prev)[0]

    def loss():
        logits = forward()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1), ignore_index=pad)

    return loss, float(tgt.ne(pad).sum())
