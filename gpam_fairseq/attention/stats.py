"""GPAM scalars in fairseq's logs and tensorboard, next to fairseq's own (loss, ppl, ...).

For every attention module whose mechanism has a negative map (declared by the mechanism's
class in the registry, ``has_negative_map``: daGPAM), logged through
``fairseq.logging.metrics.log_scalar`` so that they reach ``train_inner``, ``train`` and
``valid`` exactly like fairseq's scalars (JSON/simple logs and ``--tensorboard-logdir``):

    gpam/<where>/lambda_pos   lambda+ (mean over heads), only with --gpam-trainable-lambda
    gpam/<where>/lambda_neg   lambda-, idem
    gpam/<where>/neg_share    share of negative attention mass: sum(max(-P_G, 0)) / sum(|P_G|)
    gpam/<where>/row_sum      mean row sum of P_G over rows with an unmasked key (1 + lambda+ - lambda-)

``<where>`` is the block kind (``enc_self``, ``dec_self``, ``cross``: the layers of a kind are
averaged) or, with ``--gpam-stats-per-layer``, the layer (``enc0_self``, ``dec1_cross``, ...).

Cost control: during training the scalars are computed once every ``--gpam-stats-interval``
updates (0 switches them off, and then nothing is attached at all), during validation on
every batch; always from the public API of the mechanism (``lambdas()``, ``w_q_neg`` and
:func:`gpam_fairseq.attention.functional.dagpam_weights`) on a subsample: the first
sentence of the batch and at most ``SAMPLE_QUERIES`` query rows spread evenly over it,
under ``no_grad``. Nothing is computed outside fairseq's training and validation loops
(no aggregator but fairseq's "default" is active there: fairseq-generate, hub, tests).
Mechanisms without a negative map (softmax) get nothing attached: no cost.
"""

import re
from typing import Optional

import torch
from fairseq.logging import metrics
from fairseq.utils import safe_getattr
from torch import Tensor, nn

from gpam_fairseq.attention import functional, masks
from gpam_fairseq.attention.config import GPAMConfigError
from gpam_fairseq.attention.mechanisms import Mechanism
from gpam_fairseq.options import DEFAULTS

SAMPLE_QUERIES = 16
PRIORITY = 1000  # after fairseq's own scalars in the printed logs
ROLE_OF = {("encoder", "self_attn"): "enc_self", ("decoder", "self_attn"): "dec_self", ("decoder", "encoder_attn"): "cross"}
_WRAPPERS = re.compile(r"(^|\.)_(fsdp_wrapped_module|fpw_module|checkpoint_wrapped_module)(?=\.|$)")
_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)$")


def has_negative_map(mechanism: nn.Module) -> bool:
    """Whether the mechanism's registered class declares a negative map (its scalars are logged)."""
    return isinstance(mechanism, Mechanism) and mechanism.has_negative_map


def in_fairseq_loop() -> bool:
    """True inside fairseq-train's train/valid aggregation contexts, False elsewhere."""
    return any(name != "default" for name in metrics._active_aggregators)


def label_of(module_name: str, per_layer: bool) -> str:
    name = _WRAPPERS.sub("", module_name).lstrip(".")
    m = _LAYER.search(name)
    if m is None:
        return re.sub(r"[^A-Za-z0-9_]+", "_", name)
    side, layer, kind = m.groups()
    role = ROLE_OF.get((side, kind), f"{side}_{kind}")
    if not per_layer:
        return role
    return f"{side[:3]}{layer}_{role.split('_')[-1]}"


class AttentionStats:
    """The scalars of one attention module. A plain object, not an nn.Module: it adds no
    parameter, buffer or submodule to the model (state dicts and reprs are unchanged)."""

    def __init__(self, label: str, interval: int):
        self.prefix = f"gpam/{label}/"
        self.interval = interval
        self.num_updates = 0
        self.last_logged_update = -1

    def __call__(self, attention: nn.Module, q: Tensor, k: Tensor, mask) -> None:
        """An observer of GPAMMultiheadAttention (``add_observer``): the per-head q (B,H,Tq,d),
        k and the call's mask (a masks.Mask, or an additive bias tensor)."""
        if attention.training:
            if self.num_updates % self.interval or self.num_updates == self.last_logged_update:
                return
        if not in_fairseq_loop():
            return
        if attention.training:
            self.last_logged_update = self.num_updates
        with torch.no_grad():
            names, values = self.compute(attention.mechanism, q, k, masks.as_mask(mask).dense_bias(q, k))
        for name, value in zip(names, values.tolist()):  # one device sync per call
            metrics.log_scalar(self.prefix + name, value, weight=1, priority=PRIORITY, round=4)

    @staticmethod
    def compute(mechanism: nn.Module, q: Tensor, k: Tensor, bias: Optional[Tensor]):
        rows = torch.linspace(0, q.size(-2) - 1, min(q.size(-2), SAMPLE_QUERIES), device=q.device).round().long()
        q = q[:1, :, rows].float()
        k = k[:1].float()
        if bias is not None:
            bias = bias[:1].float()
            if bias.size(-2) > 1:
                bias = bias[..., rows, :]
        lambda_pos, lambda_neg = mechanism.lambdas()
        p_g, p_pos, _ = functional.dagpam_weights(q, k, mechanism.w_q_neg.float(), lambda_pos, lambda_neg, bias)
        has_key = (p_pos.sum(-1) > 0.5).to(p_g.dtype)  # fully masked rows are all zeros
        # mean over the rows with a key, without boolean indexing (a host sync on GPUs); 0/0 = nan
        row_sum = (p_g.sum(-1) * has_key).sum() / has_key.sum()
        neg_share = (-p_g).clamp(min=0).sum() / p_g.abs().sum().clamp(min=1e-12)
        names, values = ["neg_share", "row_sum"], [neg_share, row_sum]
        if isinstance(lambda_pos, Tensor):  # trainable
            names += ["lambda_pos", "lambda_neg"]
            values += [lambda_pos.detach().float().mean(), lambda_neg.detach().float().mean()]
        return names, torch.stack(values)


def attach(model: nn.Module, args) -> int:
    """Attach AttentionStats to every attention module with a negative map, per the flags.

    Returns the number of modules attached. Called by the models' build_model."""
    interval = safe_getattr(args, "gpam_stats_interval", None)
    interval = DEFAULTS["gpam_stats_interval"] if interval is None else interval
    try:
        interval = int(interval)
    except (TypeError, ValueError):
        raise GPAMConfigError(f"--gpam-stats-interval: expected an integer >= 0, got {interval!r}") from None
    if interval < 0:
        raise GPAMConfigError(f"--gpam-stats-interval: expected an integer >= 0 (0 = off), got {interval!r}")
    if interval == 0:
        return 0
    per_layer = bool(safe_getattr(args, "gpam_stats_per_layer", False))
    attached = 0
    for name, module in model.named_modules():
        mechanism = getattr(module, "mechanism", None)
        if has_negative_map(mechanism):
            module.add_observer(AttentionStats(label_of(name, per_layer), interval))
            attached += 1
    return attached


def observers_of(model: nn.Module):
    """Every AttentionStats attached to the model's attention modules."""
    for module in model.modules():
        for observer in getattr(module, "observers", ()):
            if isinstance(observer, AttentionStats):
                yield observer


def set_num_updates(model: nn.Module, num_updates: int) -> None:
    """Called by the models' set_num_updates (fairseq calls it after every update)."""
    for stats in observers_of(model):
        stats.num_updates = num_updates
