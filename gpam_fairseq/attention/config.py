"""The validated GPAM options the attention layers receive, and the error raised for a refused option value.

Below both the mechanisms (which read these options) and :mod:`gpam_fairseq.options` (which
declares the flags, reads the mechanism registry and builds a :class:`GPAMOptions`), so that
neither imports the other's module. No fairseq here: the attention package imports nothing
above itself. :mod:`gpam_fairseq.options` raises the one and builds the other, and imports both
from here.
"""

from dataclasses import dataclass, fields
from typing import FrozenSet

ROLES = ("enc_self", "dec_self", "cross")


class GPAMConfigError(ValueError):
    """A GPAM option has a value we refuse; the message is one line naming the flag."""


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
    recompute_attention: bool = False

    def type_for(self, role: str) -> str:
        """The attention type of a block: --attention-type if listed in --gpam-blocks."""
        return self.attention_type if role in self.blocks else "softmax"


# the flag names of the options GPAMOptions holds (gpam_lambda_pos, ...), as mechanisms declare what they read
OPTION_NAMES = tuple(f.name if f.name == "attention_type" else "gpam_" + f.name for f in fields(GPAMOptions))
