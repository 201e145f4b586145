"""Attention mechanisms: --attention-type name -> module holding that mechanism's parameters.

A mechanism maps per-head queries, keys and values to per-head outputs (and, when asked,
the attention weights). It owns only what is specific to it (W_Q- and the lambdas for
daGPAM); projections, masks and caches live in :mod:`gpam_fairseq.attention.multihead`.
The math itself is in :mod:`gpam_fairseq.attention.functional` (daGPAM's reference math),
:mod:`gpam_fairseq.attention.paths` (the calls, explicit or fused) and
:mod:`gpam_fairseq.attention.alternatives` (the other mechanisms).

The registry ``MECHANISMS`` (name -> class, in registration order) is the one list of
attention types. Adding one takes its math as a function in alternatives.py and one
:class:`Mechanism` subclass here, decorated with :func:`register_mechanism`, that declares:

    name               its --attention-type value
    help               one line for the help of --attention-type
    new_parameters     its parameters: a stock softmax checkpoint has none of them, so
                       fine-tuning one initialises them fresh (gpam_fairseq/finetune.py)
    fp32_parameters    those of them that stay fp32 after model.half() (Mechanism._apply)
    has_negative_map   whether the daGPAM scalars are logged for it (attention/stats.py, which
                       reads its ``lambdas()`` and ``w_q_neg``)
    options_read       the GPAM options it reads, by flag name (gpam_lambda_pos, ...: the fields of
                       GPAMOptions); options.TYPE_OPTIONS is what the types read together, and
                       those given with a type that does not read them are reported as having no effect

The --attention-type choices and help, fine-tuning, half precision, the scalars and that
report all read the registry; tests/test_mechanism_registry.py checks every declaration of
every type against what its module does.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpam_fairseq.attention import alternatives, functional, masks, paths
from gpam_fairseq.attention.config import OPTION_NAMES, GPAMConfigError, GPAMOptions


class Mechanism(nn.Module):
    """What every mechanism shares: the declarations of the registry (see the module docstring),
    the constructor's arguments (each mechanism reads the ones it needs: diff its
    ``layer_index``, daGPAM its ``options``), the plain per-head scores Q K^T / sqrt(d_h) + M
    returned for ``before_softmax``, and keeping ``fp32_parameters`` fp32 under ``half()``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    new_parameters: ClassVar[Tuple[str, ...]] = ()
    fp32_parameters: ClassVar[Tuple[str, ...]] = ()
    has_negative_map: ClassVar[bool] = False
    options_read: ClassVar[Tuple[str, ...]] = ()

    def __init__(
        self, num_heads: int = 0, head_dim: int = 0, options: Optional[GPAMOptions] = None, layer_index: int = 1
    ):
        super().__init__()

    def scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return functional.attention_scores(q, k, bias)

    # TorchScript. A mechanism's ``forward`` (fused kernels, autograd Functions, Mask objects) is
    # left out of ``torch.jit.script``; the scripted attention calls ``scripted`` and
    # ``scripted_scores`` instead: the explicit reference math, with a dense additive ``bias``.

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            torch.jit.unused(cls.forward)

    def scripted(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        raise RuntimeError("torch.jit.script: this --attention-type has no TorchScript path (softmax and dagpam have)")

    def scripted_scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor]) -> Tensor:
        return functional.attention_scores(q, k, bias)

    def _apply(self, fn, recurse=True):
        """Scalars that steer a whole map (lambda, gain, shift) stay fp32 after model.half(), so
        that they and what they weigh are never rounded to half precision."""
        super()._apply(fn, recurse)
        for name in self.fp32_parameters:
            param = getattr(self, name, None)  # some exist only with some options (daGPAM's thetas)
            if param is not None and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        return self


MECHANISMS: Dict[str, Type[Mechanism]] = {}


def register_mechanism(cls: Type[Mechanism]) -> Type[Mechanism]:
    """Class decorator: make ``cls`` an --attention-type, after checking its declarations."""
    where = f"@register_mechanism {getattr(cls, '__name__', cls)!r}"
    if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
        raise TypeError(f"{where}: not a subclass of Mechanism")
    if not cls.name or cls.name in MECHANISMS:
        raise TypeError(f"{where}: name {cls.name!r} is empty or already registered")
    if not cls.help or "\n" in cls.help:
        raise TypeError(f"{where}: help must be one line for --attention-type's help")
    if not set(cls.fp32_parameters) <= set(cls.new_parameters):
        raise TypeError(f"{where}: fp32_parameters must be among its new_parameters")
    if cls.has_negative_map and not ("w_q_neg" in cls.new_parameters and callable(getattr(cls, "lambdas", None))):
        raise TypeError(
            f"{where}: has_negative_map needs w_q_neg among new_parameters and a lambdas() method (the scalars read both)"
        )
    unknown = [name for name in cls.options_read if name not in OPTION_NAMES]
    if unknown:
        raise TypeError(f"{where}: options_read {unknown} are not GPAM options; choose from {', '.join(OPTION_NAMES)}")
    MECHANISMS[cls.name] = cls
    return cls


@register_mechanism
class SoftmaxMechanism(Mechanism):
    """Conventional scaled dot-product attention, softmax(Q K^T / sqrt(d_h) + M) V."""

    name = "softmax"
    help = "the stock Transformer's attention, for baselines trained by the same code"

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        return paths.softmax_attention(q, k, v, bias, dropout_p, need_weights)

    def scripted(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        probs = functional.masked_softmax(functional.attention_scores(q, k, bias))
        out = F.dropout(probs, dropout_p, training=dropout_p > 0).to(v.dtype) @ v
        return out, (probs if need_weights else None)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@register_mechanism
class DaGPAMMechanism(Mechanism):
    """Dual-attention GPAM: (1 + lambda+) softmax(Q+ K^T) - lambda- softmax(Q- K^T), times V.

    Parameters: ``w_q_neg`` (d_h x d_h, or one per head) and, with trainable lambdas,
    ``lambda_pos_theta`` / ``lambda_neg_theta`` with lambda = softplus(theta) > 0 (one value
    per module, or one per head). The thetas stay fp32 even after ``model.half()`` so that
    lambda and the combination of the two maps are never rounded to half precision.
    """

    name = "dagpam"
    help = "dual-attention GPAM, the mechanism of the paper"
    new_parameters = ("w_q_neg", "lambda_pos_theta", "lambda_neg_theta")
    fp32_parameters = ("lambda_pos_theta", "lambda_neg_theta")
    has_negative_map = True
    options_read = ("gpam_lambda_pos", "gpam_lambda_neg", "gpam_trainable_lambda", "gpam_lambda_scope",
                    "gpam_neg_query", "gpam_neg_query_init", "gpam_recompute_attention")

    def __init__(self, num_heads: int, head_dim: int, options: GPAMOptions, layer_index: int = 1):
        super().__init__()
        self.recompute = options.recompute_attention
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
        return paths.dagpam_attention(
            q, k, v, self.w_q_neg, lambda_pos, lambda_neg, bias, dropout_p, need_weights, recompute=self.recompute
        )

    def scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return functional.dagpam_scores(q, k, self.w_q_neg, bias)

    def scripted(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The explicit path of ``paths.dagpam_attention``, with the lambdas as tensors."""
        if hasattr(self, "lambda_pos_theta"):  # trainable: decided when the module is scripted
            dtype = functional.accumulation_dtype(self.lambda_pos_theta)
            lambda_pos = F.softplus(self.lambda_pos_theta.to(dtype)).view(-1, 1, 1)
            lambda_neg = F.softplus(self.lambda_neg_theta.to(dtype)).view(-1, 1, 1)
        else:
            dtype = functional.accumulation_dtype(q)
            lambda_pos = torch.full((1, 1, 1), self.lambda_pos_fixed, dtype=dtype, device=q.device)
            lambda_neg = torch.full((1, 1, 1), self.lambda_neg_fixed, dtype=dtype, device=q.device)
        probs = functional.dagpam_probabilities(q, k, self.w_q_neg, bias)
        p_pos, p_neg = probs.unbind(-3)
        p_g = torch.addcmul(p_pos * (1.0 + lambda_pos), p_neg, lambda_neg, value=-1.0)  # functional.signed_sum
        mixed = p_g
        if dropout_p > 0:
            d_pos, d_neg = F.dropout(probs, dropout_p, training=True).unbind(-3)
            mixed = torch.addcmul(d_pos * (1.0 + lambda_pos), d_neg, lambda_neg, value=-1.0)
        return mixed.to(v.dtype) @ v, (p_g if need_weights else None)

    def scripted_scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor]) -> Tensor:
        return functional.dagpam_scores(q, k, self.w_q_neg, bias)

    def extra_repr(self) -> str:
        lp, ln = self.lambdas()
        show = lambda x: f"{x:g}" if isinstance(x, float) else f"trainable{tuple(x.flatten().tolist())}"
        return (
            f"w_q_neg={tuple(self.w_q_neg.shape)}, init={self.neg_query_init}, "
            f"lambda_pos={show(lp)}, lambda_neg={show(ln)}" + (", recompute" if self.recompute else "")
        )


# ----------------------------------------------------------------------------- alternatives
# The mechanisms the paper compares daGPAM with (their math: alternatives.py).


@register_mechanism
class DiffMechanism(Mechanism):
    """Differential attention (Ye et al. 2024, arXiv:2410.05258), see ``alternatives.diff_attention``.

    Heads 2i and 2i+1 form one differential head (so the number of heads must be even):
    A = softmax(Q1 K1^T) - lambda softmax(Q2 K2^T), O = (1 - lambda_init) RMSNorm(A [V1 V2]).
    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, with
    four learned d_h-vectors per module (initialised N(0, 0.1^2)) and the depth-dependent
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) of the module's layer l (1-based, counted
    within its encoder or decoder stack). The RMSNorm over 2 d_h has a learned scale.
    ``scores`` are the plain per-head ones: head 2i holds Q1 K1^T, head 2i+1 Q2 K2^T of
    differential head i.
    """

    name = "diff"
    help = "Differential Transformer, Ye et al. 2024; pairs heads, so their number must be even"
    new_parameters = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "norm_weight")
    fp32_parameters = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")

    def __init__(self, num_heads: int, head_dim: int, options: Optional[GPAMOptions] = None, layer_index: int = 1):
        super().__init__()
        if num_heads % 2:
            raise GPAMConfigError(
                f"--encoder-attention-heads/--decoder-attention-heads: --attention-type diff pairs "
                f"heads 2i, 2i+1 into one differential head, so the number of heads must be even, got {num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.layer_index = layer_index
        self.lambda_init = alternatives.diff_lambda_init(layer_index)
        self.lambda_q1 = nn.Parameter(torch.empty(head_dim))
        self.lambda_k1 = nn.Parameter(torch.empty(head_dim))
        self.lambda_q2 = nn.Parameter(torch.empty(head_dim))
        self.lambda_k2 = nn.Parameter(torch.empty(head_dim))
        self.norm_weight = nn.Parameter(torch.ones(2 * head_dim))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
                p.normal_(0.0, 0.1)
            self.norm_weight.fill_(1.0)

    def lambda_full(self) -> Tensor:
        return alternatives.diff_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        return alternatives.diff_attention(
            q, k, v, self.lambda_full(), self.lambda_init, self.norm_weight, bias, dropout_p, need_weights
        )

    def extra_repr(self) -> str:
        return f"pairs={self.num_heads // 2}, layer={self.layer_index}, lambda_init={self.lambda_init:.4f}"


@register_mechanism
class CoDAMechanism(Mechanism):
    """Compositional de-attention (Tay et al. 2019): tanh(E) * sigmoid(N) V, not normalised.

    E = Q K^T / sqrt(d_h), N = -||q_i - k_j||_1 / sqrt(d_h); weights lie in (-1/2, 1/2).
    No parameters. See ``alternatives.coda_attention``.
    """

    name = "coda"
    help = "compositional de-attention, Tay et al. 2019"

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        return alternatives.coda_attention(q, k, v, bias, dropout_p, need_weights)

    def scores(self, q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """E and N stacked on a leading axis of size 2 (masked entries -inf in both)."""
        e = functional.attention_scores(q, k, bias)
        l1 = alternatives.l1_distances(q.reshape(-1, q.size(-2), q.size(-1)), k.reshape(-1, k.size(-2), k.size(-1)))
        n = -l1.view(e.shape) * q.size(-1) ** -0.5
        keep = masks.unmasked_keys(bias)
        if keep is not None:
            n = n.masked_fill(~keep, float("-inf"))
        return torch.stack([e, n])


@register_mechanism
class NAPMechanism(Mechanism):
    """Normalized attention pooling (Richter & Wattenhofer 2020, arXiv:2005.09561).

    W = gain * (S - mean S) / std S + shift over each query's unmasked keys, O = W V; one
    learned (gain, shift) per head, initialised (1, 0) as in the authors' code, kept fp32.
    See ``alternatives.nap_attention``.
    """

    name = "nap"
    help = "normalized attention pooling, Richter & Wattenhofer 2020"
    new_parameters = ("gain", "shift")
    fp32_parameters = ("gain", "shift")

    def __init__(self, num_heads: int, head_dim: int, options: Optional[GPAMOptions] = None, layer_index: int = 1):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(num_heads))
        self.shift = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        gain, shift = (p.to(functional.accumulation_dtype(p)).view(-1, 1, 1) for p in (self.gain, self.shift))
        return alternatives.nap_attention(q, k, v, gain, shift, bias, dropout_p, need_weights)


@register_mechanism
class UnnormalizedMechanism(Mechanism):
    """Scaled scores used directly as weights: (Q K^T / sqrt(d_h)) V, masked keys 0.

    Our reading of the GPAM paper's "NON" baseline. See ``alternatives.unnormalized_attention``.
    """

    name = "unnormalized"
    help = "scaled scores times V, the paper's unnormalized baseline"

    def forward(self, q, k, v, bias=None, dropout_p: float = 0.0, need_weights: bool = False):
        return alternatives.unnormalized_attention(q, k, v, bias, dropout_p, need_weights)


def build_mechanism(
    attention_type: str, num_heads: int, head_dim: int, options: GPAMOptions, layer_index: int = 1
) -> Mechanism:
    """The mechanism module; ``layer_index`` (1-based, within its stack) matters to diff only."""
    return MECHANISMS[attention_type](num_heads, head_dim, options, layer_index=layer_index)
