"""Attention mechanisms: --attention-type name -> module holding that mechanism's parameters.

A mechanism maps per-head queries, keys and values to per-head outputs (and, when asked,
the attention weights). It owns only what is specific to it (W_Q- and the lambdas for
daGPAM); projections, masks and caches live in :mod:`gpam_fairseq.attention.multihead`.
The math itself is in :mod:`gpam_fairseq.attention.functional`.

Adding a mechanism: one function in functional.py, one class here, one entry in
``MECHANISMS``, and its tests.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpam_fairseq.attention import functional
from gpam_fairseq.options import GPAMOptions


class SoftmaxMechanism(nn.Module):
    """Conventional scaled dot-product attention, softmax(Q K^T / sqrt(d_h) + M) V."""

    name = "softmax"

    def __init__(self, num_heads: int, head_dim: int, options: Optional[GPAMOptions] = None):
        super().__init__()

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        return functional.softmax_attention(q, k, v, bias, dropout_p, need_weights)

    def scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return functional.attention_scores(q, k, bias)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class DaGPAMMechanism(nn.Module):
    """Dual-attention GPAM: (1 + lambda+) softmax(Q+ K^T) - lambda- softmax(Q- K^T), times V.

    Parameters: ``w_q_neg`` (d_h x d_h, or one per head) and, with trainable lambdas,
    ``lambda_pos_theta`` / ``lambda_neg_theta`` with lambda = softplus(theta) > 0 (one value
    per module, or one per head). The thetas stay fp32 even after ``model.half()`` so that
    lambda and the combination of the two maps are never rounded to half precision.
    """

    name = "dagpam"

    def __init__(self, num_heads: int, head_dim: int, options: GPAMOptions):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        shape = (head_dim, head_dim) if options.neg_query == "shared" else (num_heads, head_dim, head_dim)
        self.neg_query_init = options.neg_query_init
        self.w_q_neg = nn.Parameter(torch.empty(shape))
        self.trainable_lambda = options.trainable_lambda
        if options.trainable_lambda:
            n = num_heads if options.lambda_scope == "head" else 1
            self.lambda_pos_theta = nn.Parameter(
                torch.full((n,), _inverse_softplus(options.lambda_pos))
            )
            self.lambda_neg_theta = nn.Parameter(
                torch.full((n,), _inverse_softplus(options.lambda_neg))
            )
        else:
            self.lambda_pos_fixed = options.lambda_pos
            self.lambda_neg_fixed = options.lambda_neg
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            if self.neg_query_init == "neg_identity":
                eye = torch.eye(self.head_dim, dtype=self.w_q_neg.dtype)
                self.w_q_neg.copy_(-eye.expand_as(self.w_q_neg))
            else:
                for w in self.w_q_neg.view(-1, self.head_dim, self.head_dim):
                    nn.init.xavier_uniform_(w)

    def lambdas(self) -> Tuple[Union[float, Tensor], Union[float, Tensor]]:
        """(lambda+, lambda-): floats, or fp32 tensors shaped (n, 1, 1) to broadcast over heads."""
        if not self.trainable_lambda:
            return self.lambda_pos_fixed, self.lambda_neg_fixed
        pos, neg = (
            F.softplus(t.to(functional.accumulation_dtype(t))).view(-1, 1, 1)
            for t in (self.lambda_pos_theta, self.lambda_neg_theta)
        )
        return pos, neg

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        lambda_pos, lambda_neg = self.lambdas()
        return functional.dagpam_attention(
            q, k, v, self.w_q_neg, lambda_pos, lambda_neg, bias, dropout_p, need_weights
        )

    def scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return functional.dagpam_scores(q, k, self.w_q_neg, bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.trainable_lambda:
            for theta in (self.lambda_pos_theta, self.lambda_neg_theta):
                if theta.dtype in (torch.float16, torch.bfloat16):
                    theta.data = theta.data.float()
        return self

    def extra_repr(self) -> str:
        lp, ln = self.lambdas()
        show = lambda x: f"{x:g}" if isinstance(x, float) else f"trainable{tuple(x.flatten().tolist())}"
        return (
            f"w_q_neg={tuple(self.w_q_neg.shape)}, init={self.neg_query_init}, "
            f"lambda_pos={show(lp)}, lambda_neg={show(ln)}"
        )


MECHANISMS = {m.name: m for m in (SoftmaxMechanism, DaGPAMMechanism)}


def build_mechanism(attention_type: str, num_heads: int, head_dim: int, options: GPAMOptions) -> nn.Module:
    return MECHANISMS[attention_type](num_heads, head_dim, options)
