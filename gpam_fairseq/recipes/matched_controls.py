"""The matched baselines: MODEL=baseline_params and MODEL=baseline_maps.

A daGPAM model differs from the stock one in two ways a gain could come from besides its
attention: it has a few more parameters (W_Q- and, when trainable, the lambdas) and it
computes two attention maps per head instead of one. Each control removes one of them:

* ``baseline_params``: the stock architecture with its FFN widened so that it has as many
  parameters as the daGPAM model of the same command line. The extra parameters of daGPAM are
  counted on the real attention modules (built on PyTorch's meta device, so without memory)
  for the parsed command line, ``GPAM_ARGS`` included (``--gpam-neg-query``,
  ``--gpam-trainable-lambda``, ``--gpam-lambda-scope``, ``--gpam-blocks`` change them); one FFN
  unit of a layer costs 2 d + 1 parameters (a row of fc1 with its bias, a column of fc2), so
  every FFN of the encoder and the decoder is widened by the same k = round(extra / cost of one
  unit in every layer). The difference left is below half the cost of one unit in every layer
  (a few dozen to a few thousand parameters, far below 0.1 % of any recipe's model).
* ``baseline_maps``: the stock architecture with twice the attention heads at the same width
  (head dimension halved), so that it computes as many attention maps per layer as daGPAM
  does (daGPAM: a positive and a negative map per head in each of its blocks). Same parameters
  as the stock model: fairseq's projections are d x d whatever the number of heads.

Both keep every other flag of the recipe's command line; their flags come last, after
``EXTRA_ARGS``, and are computed from the command line that includes them (so a shrunk model
given in ``EXTRA_ARGS`` gets its own matched width).
"""

import functools
from typing import Dict, List, Sequence, Tuple

from gpam_fairseq.fairseq_glue.tools import IWSLT_DE, IWSLT_EN, WIKI103, WMT_JOINED

CONTROLS = ("baseline_params", "baseline_maps")
BASELINES = ("baseline", *CONTROLS)

# Dictionary sizes the parameter tables of the READMEs assume (fairseq-preprocess pads every
# dictionary to a multiple of 8). The extra and matched parameters do not depend on them.
DICTIONARIES = {
    # (source, target, joined): IWSLT14 de-en 10k joint BPE, separate dictionaries
    "iwslt14": (IWSLT_DE, IWSLT_EN, False),
    # a 32,768-symbol joined dictionary (SETUP=scaling_nmt's --nwordssrc/--nwordstgt 32768)
    "wmt14_en_de": (WMT_JOINED, WMT_JOINED, True),
    "wikitext103": WIKI103,  # word level, fairseq's WikiText-103 dictionary
    "enwik8": 208,  # 204 byte values + 4 special symbols
    "ptb": 10008,  # Mikolov's 10k words (<unk> is fairseq's own) + 3 specials, padded to 8
}
DICTIONARY_NOTE = {
    "iwslt14": "dictionaries of 8,848 (de) and 6,632 (en) symbols, as fairseq's IWSLT14 recipe makes them",
    "wmt14_en_de": "one joined dictionary of 32,768 symbols (SETUP=scaling_nmt; icml17's 40k BPE gives a "
                   "somewhat larger one)",
    "wikitext103": "fairseq's WikiText-103 dictionary of 267,744 words",
    "enwik8": "208 symbols (204 byte values and fairseq's 4 special symbols; assumed, not read from the data)",
    "ptb": "10,008 symbols (PTB's 10k words and fairseq's special symbols, padded to a multiple of 8; assumed)",
}


class ControlError(ValueError):
    """A control cannot be built for this command line; the message names the variable or flag."""


def _roles(task: str):
    from gpam_fairseq.options import LM_ROLES, NMT_ROLES

    return NMT_ROLES if task == "translation" else LM_ROLES


def _stack(role: str) -> str:
    return "encoder" if role == "enc_self" else "decoder"


def mechanism_parameters(gpam_args, task: str) -> int:
    """The parameters the attention type of ``gpam_args`` (fairseq's parsed arguments of a
    transformer_gpam / transformer_lm_gpam command line) adds over softmax attention: its
    mechanism modules, built for every block of every layer on the meta device and counted."""
    import torch

    from gpam_fairseq.attention.mechanisms import build_mechanism
    from gpam_fairseq.options import gpam_options_from_args

    roles = _roles(task)
    opts = gpam_options_from_args(gpam_args, roles)
    total = 0
    with torch.device("meta"):
        for role in roles:
            stack = _stack(role)
            layers = getattr(gpam_args, f"{stack}_layers")
            heads = getattr(gpam_args, f"{stack}_attention_heads")
            dim = getattr(gpam_args, f"{stack}_embed_dim")
            for layer in range(1, layers + 1):
                mechanism = build_mechanism(opts.type_for(role), heads, dim // heads, opts, layer)
                total += sum(p.numel() for p in mechanism.parameters())
    return total


def ffn_stacks(task: str) -> List[str]:
    """The stacks of a task's models: encoder and decoder for translation, the decoder otherwise."""
    return ["encoder", "decoder"] if task == "translation" else ["decoder"]


def matched_ffn(stock_args, gpam_args, task: str) -> Dict:
    """The FFN widths that give the stock model of ``stock_args`` the parameters of the daGPAM
    model of ``gpam_args``: every FFN widened by the same k units."""
    extra = mechanism_parameters(gpam_args, task)
    stacks = ffn_stacks(task)
    # one more FFN unit in every layer of a stack: fc1 gains a row (d) and a bias, fc2 a column (d)
    unit = sum(getattr(stock_args, f"{s}_layers") * (2 * getattr(stock_args, f"{s}_embed_dim") + 1) for s in stacks)
    k = int(round(extra / unit))
    widths = {s: getattr(stock_args, f"{s}_ffn_embed_dim") for s in stacks}
    return {"extra_dagpam": extra, "per_unit": unit, "units": k, "added": k * unit, "residual": k * unit - extra,
            "ffn_from": widths, "ffn_to": {s: w + k for s, w in widths.items()}}


def doubled_heads(stock_args, task: str) -> Dict:
    """Twice the attention heads of every stack at the same width; refuses a width the doubled
    number of heads does not divide."""
    out = {}
    for s in ffn_stacks(task):
        heads, dim = getattr(stock_args, f"{s}_attention_heads"), getattr(stock_args, f"{s}_embed_dim")
        if dim % (2 * heads):
            raise ControlError(
                f"MODEL=baseline_maps: --{s}-embed-dim {dim} is not divisible by 2 x --{s}-attention-heads "
                f"({2 * heads}); choose a width or head count whose doubled heads divide it")
        out[s] = {"heads_from": heads, "heads_to": 2 * heads, "head_dim_to": dim // (2 * heads)}
    return out


class _ModelArgs:
    """fairseq-train's parsed arguments of a command line, where a dataclass model (such as the stock
    transformer_lm) leaves its defaults out of the namespace: those come from its dataclass."""

    def __init__(self, args):
        from fairseq.models import ARCH_MODEL_REGISTRY

        self._args = args
        dataclass = getattr(ARCH_MODEL_REGISTRY[args.arch], "__dataclass", None)
        self._defaults = dataclass() if dataclass is not None else None

    def __getattr__(self, name):
        value = getattr(self._args, name, None)
        if value is None and self._defaults is not None:
            value = getattr(self._defaults, name, None)
        if value is None:
            raise AttributeError(name)
        return value


@functools.lru_cache(maxsize=64)
def model_args(cli: Tuple[str, ...]):
    """fairseq's argparse parsing of a training command line (argparse only: the omegaconf
    conversion, ~1 s, is not needed for sizes); cached, read only."""
    from fairseq import options

    import gpam_fairseq  # noqa: F401  (registers our models and architectures)

    try:
        args = options.parse_args_and_arch(options.get_training_parser(), ["/nonexistent-data", *cli])
    except SystemExit:  # argparse has printed why
        raise ControlError("fairseq-train's parser refused the command line (its message is above); "
                           "check EXTRA_ARGS and GPAM_ARGS") from None
    return _ModelArgs(args)


def control_flags(model: str, stock_cli: Sequence[str], gpam_cli: Sequence[str], task: str):
    """(flags to append to the stock command line, what they do) for one control. The command
    lines are fairseq-train's arguments without the data folder."""
    stock = model_args(tuple(stock_cli))
    if model == "baseline_params":
        gpam = model_args(tuple(gpam_cli))
        match = matched_ffn(stock, gpam, task)
        flags = []
        for s, width in match["ffn_to"].items():
            flags += [f"--{s}-ffn-embed-dim", str(width)]
        return flags, match
    if model == "baseline_maps":
        heads = doubled_heads(stock, task)
        flags = []
        for s, h in heads.items():
            flags += [f"--{s}-attention-heads", str(h["heads_to"])]
        return flags, heads
    raise ControlError(f"MODEL={model!r}: not a control; choose from {', '.join(CONTROLS)}")


def describe(model: str, info: Dict) -> str:
    """One line saying what the control changed."""
    if model == "baseline_params":
        widths = ", ".join(f"{s} FFN {info['ffn_from'][s]} -> {info['ffn_to'][s]}" for s in info["ffn_from"])
        return (f"{widths} (+{info['units']} units): +{info['added']:,} parameters for daGPAM's "
                f"+{info['extra_dagpam']:,} (difference {info['residual']:+,})")
    return ", ".join(f"{s} heads {h['heads_from']} -> {h['heads_to']} (head dim {h['head_dim_to']})"
                     for s, h in info.items())
