"""The validated GPAM options the attention layers receive, and the error raised for a refused option value.

Below both the mechanisms (which read these options) and :mod:`gpam_fairseq.options` (which
declares the flags, reads the mechanism registry and builds a :class:`GPAMOptions`), so that
neither imports the other's module. No fairseq here: the attention package imports nothing
above itself. ``gpam_fairseq.options`` re-exports both names, their documented home.
"""

from dataclasses import dataclass
from typing import FrozenSet

ROLES = ("enc_self", "dec_self", "cross")


class GPAMConfigError(ValueError):
    """A GPAM option has a value we refuse; the message is one line naming the flag."""

    # the name tracebacks print (``gpam_fairseq.options.GPAMConfigError: ...``) and users import
    __module__ = "gpam_fairseq.options"


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
