"""Masks: what one attention call may see (an additive bias or the causal mask), built once per forward pass."""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from gpam_fairseq.attention.functional import all_keys_masked


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor, made once per value, dtype and device (an operand that costs no kernel)."""
    key = (value, dtype, device)
    if key not in _SCALARS:  # a fill on the device: no copy from the host, no synchronisation
        _SCALARS[key] = torch.full((), value, dtype=dtype, device=device)
    return _SCALARS[key]


_SCALARS: dict = {}


class Mask:
    """What one attention call may see: an additive bias, or the causal mask.

    ``bias``: broadcastable to (B, H, Tq, Tk), ``-inf`` where a key is masked. ``causal``
    stands for the square causal mask *instead of* a bias tensor, so that the fused kernel
    takes its ``is_causal`` path (FlashAttention reads no mask at all there).

    The attention module builds one Mask per set of fairseq masks and hands the same object
    to every layer that receives them (:meth:`from_parts`), so everything derived from the
    masks is computed once per forward pass, not once per layer, and only if asked for: the
    bias, the bias for queries stacked on the query axis (built directly, not by copying the
    bias), and the query rows that see no key at all.
    """

    def __init__(self, bias: Optional[Tensor] = None, causal: bool = False):
        if causal and bias is not None:
            raise ValueError("Mask: give a bias or causal=True, not both (fold the causal mask into the bias)")
        self.causal = causal
        self._bias = bias
        self._parts: Optional[Tuple[Optional[Tensor], Optional[Tensor], torch.dtype]] = None
        self._pad_bias: Optional[Tensor] = None
        self._stacked: Optional[Tensor] = None
        self._empty_rows: Optional[Tensor] = None
        self._empty_rows_known = bias is None
        self._causal_bias = False

    @classmethod
    def from_parts(
        cls, attn_bias: Optional[Tensor], key_padding: Optional[Tensor], dtype: torch.dtype, causal_bias: bool = False
    ) -> "Mask":
        """The mask of an additive ``attn_bias`` (broadcastable to (1, 1, Tq, Tk)) and a boolean
        ``key_padding`` (B, Tk), True = pad; either may be None. ``causal_bias``: attn_bias is
        the square causal mask (then a row sees no key exactly when its prefix is all pads)."""
        mask = cls()
        mask._parts = (attn_bias, key_padding, dtype)
        mask._causal_bias = causal_bias
        mask._empty_rows_known = attn_bias is None and key_padding is None
        return mask

    def _padding_bias(self) -> Optional[Tensor]:
        _, key_padding, dtype = self._parts
        if key_padding is None:
            return None
        if self._pad_bias is None:
            device = key_padding.device
            pad = key_padding.view(key_padding.size(0), 1, 1, key_padding.size(1))
            self._pad_bias = torch.where(pad, scalar(float("-inf"), dtype, device), scalar(0.0, dtype, device))
        return self._pad_bias

    @property
    def bias(self) -> Optional[Tensor]:
        if self._bias is None and self._parts is not None:
            attn_bias, key_padding, _ = self._parts
            pad = self._padding_bias()
            self._bias = attn_bias if pad is None else pad if attn_bias is None else attn_bias + pad
        return self._bias

    @property
    def empty_rows(self) -> Optional[Tensor]:
        """True for query rows whose keys are all masked (broadcastable to (B, 1, Tq, 1)); None
        when no row can be: no bias, or the causal mask (its diagonal is always visible)."""
        if not self._empty_rows_known:
            parts = self._parts
            if parts is not None and parts[0] is None:  # padding only: a sequence of pads
                key_padding = parts[1]
                self._empty_rows = key_padding.all(-1).view(-1, 1, 1, 1)
            elif parts is not None and self._causal_bias and parts[1] is not None:  # a prefix of pads
                key_padding = parts[1]
                self._empty_rows = key_padding.cummin(-1).values.view(key_padding.size(0), 1, -1, 1)
            elif self._bias is None and self._stacked is not None:  # rows of Q+ are the first half
                self._empty_rows = all_keys_masked(self._stacked)[..., : self._stacked.size(-2) // 2, :]
            else:
                self._empty_rows = all_keys_masked(self.bias)
            self._empty_rows_known = True
        return self._empty_rows

    def stacked_bias(self) -> Optional[Tensor]:
        """The bias for two query sets laid end to end on the query axis (..., 2 Tq, Tk).

        A bias that does not depend on the query (padding: (B, 1, 1, Tk)) broadcasts as it is;
        one that does (causal + padding) is laid out twice, in the one addition that builds it."""
        if self._stacked is None:
            if self._parts is not None and self._bias is None:
                attn_bias, _, _ = self._parts
                pad = self._padding_bias()
                if attn_bias is None or attn_bias.size(-2) == 1:
                    self._stacked = self.bias
                else:
                    doubled = attn_bias.unsqueeze(-3).expand(*attn_bias.shape[:-2], 2, *attn_bias.shape[-2:])
                    self._stacked = doubled.reshape(*attn_bias.shape[:-2], -1, attn_bias.size(-1)) if pad is None else (
                        (doubled + pad.unsqueeze(-3)).flatten(-3, -2)
                    )
            else:
                bias = self.bias
                if bias is None or bias.size(-2) == 1:
                    self._stacked = bias
                else:
                    lead, (tq, tk) = bias.shape[:-2], bias.shape[-2:]
                    self._stacked = bias.unsqueeze(-3).expand(*lead, 2, tq, tk).reshape(*lead, 2 * tq, tk)
        return self._stacked

    def dense_bias(self, q: Tensor, k: Tensor) -> Optional[Tensor]:
        """The mask as one additive tensor, causal mask included (explicit paths, statistics)."""
        if not self.causal:
            return self.bias
        tq, tk = q.size(-2), k.size(-2)
        return torch.full((tq, tk), float("-inf"), dtype=q.dtype, device=q.device).triu(tk - tq + 1)


def as_mask(mask: Union[Mask, Tensor, None]) -> Mask:
    """A Mask from a Mask, an additive bias tensor or None."""
    return mask if isinstance(mask, Mask) else Mask(mask)


# fairseq masks with -inf (padding, future), and the encoder's optional attn_mask with
# -1e8 (fp32) / -1e4 (fp16). Without a softmax, a "very negative" score is not a zero
# weight, so every bias entry at or below this value counts as a masked key.
MASKED_BIAS = -1e4


def unmasked_keys(bias: Optional[Tensor]) -> Optional[Tensor]:
    """True where a key may be attended (broadcastable to the scores); None: every key."""
    return None if bias is None else bias > MASKED_BIAS
