"""The GPAM/attention command-line options, their defaults, and their validation.

One dataclass declares every option once. The NMT model (an argparse "legacy" fairseq
model) generates its argparse flags from it; the language model inherits it into its own
fairseq dataclass. Both then call :func:`gpam_options_from_args`, which validates the
values and returns a frozen :class:`GPAMOptions` that the layers receive explicitly
(never through fairseq's ``TransformerConfig``, which drops unknown keys for LMs).
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, FrozenSet, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

ATTENTION_TYPES = ("softmax", "dagpam", "diff", "coda", "nap", "unnormalized")
ROLES = ("enc_self", "dec_self", "cross")
NMT_ROLES = ROLES
LM_ROLES = ("dec_self",)
LAMBDA_SCOPES = ("module", "head")
NEG_QUERY_SHARING = ("shared", "per_head")
NEG_QUERY_INITS = ("neg_identity", "random")


class GPAMConfigError(ValueError):
    """A GPAM option has a value we refuse; the message is one line naming the flag."""


@dataclass
class GPAMConfig(FairseqDataclass):
    attention_type: ChoiceEnum(ATTENTION_TYPES) = field(
        default="dagpam",
        metadata={
            "help": "attention in the blocks named by --gpam-blocks: 'dagpam' (dual-attention "
            "GPAM), 'softmax' (the stock Transformer, for baselines trained by the same code), or "
            "the alternatives the paper compares with: 'diff' (Differential Transformer; pairs "
            "heads, so the number of heads must be even), 'coda' (compositional de-attention), "
            "'nap' (normalized attention pooling), 'unnormalized' (scaled scores times V)"
        },
    )
    gpam_lambda_pos: float = field(
        default=0.2,
        metadata={"help": "lambda+ >= 0: weight of the positive map is (1 + lambda+)"},
    )
    gpam_lambda_neg: float = field(
        default=0.2,
        metadata={
            "help": "lambda- >= 0: weight of the negative map; rows of P_G sum to "
            "1 + lambda+ - lambda- and lie in [-lambda-, 1 + lambda+]"
        },
    )
    gpam_trainable_lambda: bool = field(
        default=False,
        metadata={
            "help": "learn lambda+ and lambda- (lambda = softplus(theta) > 0, theta initialised "
            "so that lambda starts at --gpam-lambda-pos/--gpam-lambda-neg, which must be > 0)"
        },
    )
    gpam_lambda_scope: ChoiceEnum(LAMBDA_SCOPES) = field(
        default="module",
        metadata={
            "help": "with --gpam-trainable-lambda: one (lambda+, lambda-) pair per attention "
            "module, or one pair per head"
        },
    )
    gpam_blocks: str = field(
        default="enc_self,dec_self,cross",
        metadata={
            "help": "comma list of the attention blocks that use --attention-type, from "
            "enc_self, dec_self, cross (language models have only dec_self); the others stay softmax"
        },
    )
    gpam_neg_query: ChoiceEnum(NEG_QUERY_SHARING) = field(
        default="shared",
        metadata={
            "help": "W_Q- (d_h x d_h) shared by all heads of a module, or one per head "
            "(per_head multiplies the extra parameters by the number of heads)"
        },
    )
    gpam_neg_query_init: ChoiceEnum(NEG_QUERY_INITS) = field(
        default="neg_identity",
        metadata={
            "help": "initial W_Q-: -I (the paper's Lemma 6 picture: the negative map "
            "attends where the positive one does not) or random (Xavier uniform)"
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


@dataclass(frozen=True)
class GPAMOptions:
    """Validated GPAM options, as the attention layers use them."""

    attention_type: str = "dagpam"
    lambda_pos: float = 0.2
    lambda_neg: float = 0.2
    trainable_lambda: bool = False
    lambda_scope: str = "module"
    blocks: FrozenSet[str] = frozenset(ROLES)
    neg_query: str = "shared"
    neg_query_init: str = "neg_identity"

    def type_for(self, role: str) -> str:
        """The attention type of a block: --attention-type if listed in --gpam-blocks."""
        return self.attention_type if role in self.blocks else "softmax"


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
        trainable_lambda=bool(safe_getattr(args, "gpam_trainable_lambda", False)),
        lambda_scope=_choice(args, "gpam_lambda_scope", LAMBDA_SCOPES),
        blocks=parse_blocks(
            safe_getattr(args, "gpam_blocks", ",".join(available_blocks)), available_blocks
        ),
        neg_query=_choice(args, "gpam_neg_query", NEG_QUERY_SHARING),
        neg_query_init=_choice(args, "gpam_neg_query_init", NEG_QUERY_INITS),
    )
    if opts.trainable_lambda and opts.attention_type == "dagpam":
        for name, value in (("gpam_lambda_pos", opts.lambda_pos), ("gpam_lambda_neg", opts.lambda_neg)):
            if value <= 0:
                raise GPAMConfigError(
                    f"{FLAG[name]}: must be > 0 with --gpam-trainable-lambda "
                    f"(lambda = softplus(theta) cannot start at 0), got {value!r}"
                )
    return opts


def set_gpam_defaults(args: Any, available_blocks: Tuple[str, ...]) -> None:
    """Fill missing GPAM options on an argparse namespace (for architecture functions)."""
    for name, default in DEFAULTS.items():
        if name == "gpam_blocks":
            default = ",".join(available_blocks)
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)
