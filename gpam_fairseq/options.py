"""The GPAM/attention command-line options, their defaults, and their validation.

One dataclass declares every option once. The NMT model (an argparse "legacy" fairseq
model) generates its argparse flags from it; the language model inherits it into its own
fairseq dataclass. Both then call :func:`gpam_options_from_args`, which validates the
values and returns a frozen :class:`GPAMOptions` that the layers receive explicitly
(never through fairseq's ``TransformerConfig``, which drops unknown keys for LMs).

The attention types, their help and the options each reads come from the registry of
:mod:`gpam_fairseq.attention.mechanisms`. :class:`GPAMOptions` and :class:`GPAMConfigError`
are defined in :mod:`gpam_fairseq.attention.config`, below the mechanisms; the defaults of the
options GPAMOptions holds are its field defaults, which :class:`GPAMConfig` reads.
"""

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, FrozenSet, Set, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

from gpam_fairseq.attention.config import ROLES, GPAMConfigError, GPAMOptions
from gpam_fairseq.attention.mechanisms import MECHANISMS

logger = logging.getLogger(__name__)

ATTENTION_TYPES = tuple(MECHANISMS)  # registration order: softmax, dagpam, then the alternatives
_DEFAULT = GPAMOptions()  # the one declaration of the defaults of the options both hold
NMT_ROLES = ROLES
LM_ROLES = ("dec_self",)
LAMBDA_SCOPES = ("module", "head")
NEG_QUERY_SHARING = ("shared", "per_head")
NEG_QUERY_INITS = ("neg_identity", "random")


def attention_type_help() -> str:
    """The help of --attention-type: every registered type with its one-line help."""
    types = "; ".join(f"'{name}' ({mechanism.help})" for name, mechanism in MECHANISMS.items())
    return f"attention in the blocks named by --gpam-blocks (the others stay softmax): {types}"


@dataclass
class GPAMConfig(FairseqDataclass):
    attention_type: ChoiceEnum(ATTENTION_TYPES) = field(
        default=_DEFAULT.attention_type,
        metadata={"help": attention_type_help()},
    )
    gpam_lambda_pos: float = field(
        default=_DEFAULT.lambda_pos,
        metadata={"help": "lambda+ >= 0: weight of the positive map is (1 + lambda+)"},
    )
    gpam_lambda_neg: float = field(
        default=_DEFAULT.lambda_neg,
        metadata={
            "help": "lambda- >= 0: weight of the negative map; rows of P_G sum to "
            "1 + lambda+ - lambda- and lie in [-lambda-, 1 + lambda+]"
        },
    )
    gpam_trainable_lambda: bool = field(
        default=_DEFAULT.trainable_lambda,
        metadata={
            "help": "learn lambda+ and lambda- (lambda = softplus(theta) > 0, theta initialised "
            "so that lambda starts at --gpam-lambda-pos/--gpam-lambda-neg, which must be > 0)"
        },
    )
    gpam_lambda_scope: ChoiceEnum(LAMBDA_SCOPES) = field(
        default=_DEFAULT.lambda_scope,
        metadata={
            "help": "with --gpam-trainable-lambda: one (lambda+, lambda-) pair per attention "
            "module, or one pair per head"
        },
    )
    gpam_blocks: str = field(
        default=",".join(sorted(_DEFAULT.blocks, key=ROLES.index)),
        metadata={
            "help": "comma list of the attention blocks that use --attention-type, from "
            "enc_self, dec_self, cross (language models have only dec_self); the others stay softmax"
        },
    )
    gpam_neg_query: ChoiceEnum(NEG_QUERY_SHARING) = field(
        default=_DEFAULT.neg_query,
        metadata={
            "help": "W_Q- (d_h x d_h) shared by all heads of a module, or one per head "
            "(per_head multiplies the extra parameters by the number of heads)"
        },
    )
    gpam_neg_query_init: ChoiceEnum(NEG_QUERY_INITS) = field(
        default=_DEFAULT.neg_query_init,
        metadata={
            "help": "initial W_Q-: -I (the paper's Lemma 6 picture: the negative map "
            "attends where the positive one does not) or random (Xavier uniform)"
        },
    )
    gpam_recompute_attention: bool = field(
        default=_DEFAULT.recompute_attention,
        metadata={
            "help": "keep only the queries, keys and values of each daGPAM attention for the backward "
            "pass and compute its fused attention again there: less activation memory (no stacked "
            "queries, outputs or log-sum-exps) for one more fused forward call per layer"
        },
    )
    gpam_stats_interval: int = field(
        default=10,
        metadata={
            "help": "log the daGPAM scalars (trainable lambda+/-, share of negative attention "
            "mass, mean row sum) next to fairseq's own, tensorboard included, every N updates "
            "and on every validation batch, from a 16-query subsample; 0 = off"
        },
    )
    gpam_stats_per_layer: bool = field(
        default=False,
        metadata={"help": "log those scalars per layer (gpam/dec1_self/...) instead of per block kind (gpam/dec_self/...)"},
    )


_OPTIONS = [f for f in fields(GPAMConfig) if not f.name.startswith("_")]  # not fairseq's _name
FLAG = {f.name: "--" + f.name.replace("_", "-") for f in _OPTIONS}
DEFAULTS = {f.name: f.default for f in _OPTIONS}
# The options whose meaning depends on the attention type: those some type declares it reads
# (Mechanism.options_read); given with a type that does not, they are reported once.
TYPE_OPTIONS = tuple(name for name in FLAG if any(name in m.options_read for m in MECHANISMS.values()))


def _choice(args: Any, name: str, allowed: Tuple[str, ...]) -> str:
    value = str(safe_getattr(args, name, DEFAULTS[name]))
    if value not in allowed:
        raise GPAMConfigError(
            f"{FLAG[name]}: invalid value {value!r}; choose from {', '.join(allowed)}"
        )
    return value


def _non_negative(args: Any, name: str) -> float:
    raw = safe_getattr(args, name, DEFAULTS[name])
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise GPAMConfigError(f"{FLAG[name]}: expected a number >= 0, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise GPAMConfigError(f"{FLAG[name]}: must be a finite number >= 0, got {raw!r}")
    return value


def parse_blocks(text: str, available: Tuple[str, ...]) -> FrozenSet[str]:
    names = [b.strip() for b in str(text).split(",") if b.strip()]
    if not names:
        raise GPAMConfigError(
            f"--gpam-blocks: empty; give a comma list from {', '.join(available)}"
        )
    for name in names:
        if name not in ROLES:
            raise GPAMConfigError(
                f"--gpam-blocks: unknown block {name!r}; choose from {', '.join(available)}"
            )
        if name not in available:
            raise GPAMConfigError(
                f"--gpam-blocks: {name!r} does not exist in a language model, which has only "
                f"{', '.join(available)}"
            )
    return frozenset(names)


def gpam_options_from_args(args: Any, available_blocks: Tuple[str, ...]) -> GPAMOptions:
    """Read and validate the GPAM options from fairseq args (Namespace or DictConfig)."""
    opts = GPAMOptions(
        attention_type=_choice(args, "attention_type", ATTENTION_TYPES),
        lambda_pos=_non_negative(args, "gpam_lambda_pos"),
        lambda_neg=_non_negative(args, "gpam_lambda_neg"),
        trainable_lambda=bool(safe_getattr(args, "gpam_trainable_lambda", DEFAULTS["gpam_trainable_lambda"])),
        lambda_scope=_choice(args, "gpam_lambda_scope", LAMBDA_SCOPES),
        blocks=parse_blocks(
            safe_getattr(args, "gpam_blocks", ",".join(available_blocks)), available_blocks
        ),
        neg_query=_choice(args, "gpam_neg_query", NEG_QUERY_SHARING),
        neg_query_init=_choice(args, "gpam_neg_query_init", NEG_QUERY_INITS),
        recompute_attention=bool(safe_getattr(args, "gpam_recompute_attention", DEFAULTS["gpam_recompute_attention"])),
    )
    read = set(MECHANISMS[opts.attention_type].options_read)
    if opts.trainable_lambda and "gpam_trainable_lambda" in read:
        for name, value in (("gpam_lambda_pos", opts.lambda_pos), ("gpam_lambda_neg", opts.lambda_neg)):
            if value <= 0:
                raise GPAMConfigError(
                    f"{FLAG[name]}: must be > 0 with --gpam-trainable-lambda "
                    f"(lambda = softplus(theta) cannot start at 0), got {value!r}"
                )
    if {"gpam_lambda_pos", "gpam_lambda_neg"} <= read and opts.lambda_neg >= 1 + opts.lambda_pos:
        pos, neg = FLAG["gpam_lambda_pos"], FLAG["gpam_lambda_neg"]
        raise GPAMConfigError(
            f"{neg}: {opts.lambda_neg:g} >= 1 + {pos} ({opts.lambda_pos:g}); rows of P_G would sum to "
            f"1 + lambda+ - lambda- = {1 + opts.lambda_pos - opts.lambda_neg:g} <= 0; choose {neg} < 1 + {pos}"
        )
    warn_options_not_read(opts)
    return opts


def option_value(opts: GPAMOptions, name: str) -> Any:
    """The validated value of the option ``name`` (gpam_lambda_pos -> opts.lambda_pos, ...)."""
    return getattr(opts, name[len("gpam_"):] if name.startswith("gpam_") else name)


_reported: Set[str] = set()  # the reports of warn_options_not_read made in this process


def warn_options_not_read(opts: GPAMOptions) -> None:
    """Warn once per process, in one line, about the options that depend on the attention type,
    that ``opts.attention_type`` does not read and that differ from their defaults: "given" is
    "not at the default", the one reading that holds for command lines, hydra configs and the
    options stored in checkpoints alike. Not an error: the recipes give the same flags to
    every system."""
    read = set(MECHANISMS[opts.attention_type].options_read)
    ignored = [name for name in TYPE_OPTIONS if name not in read and option_value(opts, name) != DEFAULTS[name]]
    if not ignored:
        return
    readers = [t for t, m in MECHANISMS.items() if set(ignored) & set(m.options_read)]
    message = (
        f"{FLAG['attention_type']} {opts.attention_type} does not read {', '.join(FLAG[n] for n in ignored)} "
        f"(set away from their defaults; read by {', '.join(readers) or 'no type'}): they have no effect"
    )
    if message not in _reported:
        _reported.add(message)
        logger.warning(message)


def set_gpam_defaults(args: Any, available_blocks: Tuple[str, ...]) -> None:
    """Fill missing GPAM options on an argparse namespace (for architecture functions)."""
    for name, default in DEFAULTS.items():
        if name == "gpam_blocks":
            default = ",".join(available_blocks)
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)
