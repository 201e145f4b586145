"""``--bf16`` on CPUs and CUDA GPUs, and the precision flags fairseq cannot run on a CPU.

fairseq-fixed 0.12.3.1 treats ``--bf16`` as TPU-only: ``options.parse_args_and_arch`` sets
``tpu = True`` whenever ``bf16`` is set, and ``Trainer`` then asks torch_xla for its device
(``AttributeError: 'NoneType' object has no attribute 'xla_device'`` without it). The inference
programs (fairseq-generate, -interactive, -eval-lm) accept the flag and ignore it: they run in
fp32. With ``--user-dir gpam_fairseq`` (or after ``import gpam_fairseq``), where torch_xla is not
importable, ``--bf16`` (``common.bf16=true`` in fairseq-hydra-train) means instead:

* **bf16 autocast with fp32 weights.** The model's weights, its gradients and the optimizer
  state stay fp32 (fairseq's plain optimizer, no fp32 master copy, no loss scale: bf16 has fp32's
  exponent range). The criterion's forward (the model's forward and the loss), in training and in
  validation, runs under ``torch.autocast(<device>, torch.bfloat16)``; so do the beam search of
  fairseq-generate/-interactive (``SequenceGenerator``) and the scoring of fairseq-eval-lm
  (``SequenceScorer``). Backward and the optimizer step run outside autocast, as torch
  recommends. Autocast computes the matrix products in bf16 and keeps softmax, log-softmax,
  normalisations and losses in fp32; daGPAM's own fp32 pieces (lambda, the combination of the
  two maps, the softmaxes) stay fp32 as well.
* Checkpoints hold fp32 weights and the plain optimizer's state, exactly as an fp32 run's: a
  ``--bf16`` checkpoint loads without ``--bf16`` and the reverse, and a run resumed after a kill
  ends bit for bit as the uninterrupted run.
* ``--memory-efficient-bf16`` keeps fairseq's own meaning (only the TPU assumption goes): the
  model is cast to bf16 (our fp32 pieces stay fp32), no fp32 copy of the weights exists, and
  fairseq's ``MemoryEfficientFP16Optimizer`` keeps the optimizer state in fp32 and writes each
  update back into the bf16 weights. fairseq saves half tensors upcast to fp32, so its checkpoints
  hold bf16 numbers in fp32 and load into an fp32 model exactly.
* Where torch_xla is importable (a TPU host) nothing of this applies: fairseq's own behaviour.

Why autocast rather than fairseq's bf16 weights with an fp32 master copy (``FP16Optimizer``): that
optimizer keeps its fp32 master weights only in memory and fairseq saves the bf16 model, so a
resumed run restarts from rounded weights (no bit-exact resume); its checkpoints and optimizer
class differ from an fp32 run's, so switching precision between runs needs
``--reset-optimizer``; and every operation, normalisations included, would run on bf16 tensors.

The same hooks refuse, with one line and exit status 2, what fairseq cannot train on a CPU:
``--fp16`` (its fp32 master weights live in a flat CUDA buffer: it dies in ``torch.cuda``) unless
``--fp16-no-flatten-grads`` or ``--memory-efficient-fp16`` is given, and ``--amp`` (CUDA's fp16
autocast and gradient scaler: on a CPU fairseq switches both off and silently trains in fp32).

The hooks are installed when gpam_fairseq is imported. fairseq's command lines import
``--user-dir`` inside ``parse_args_and_arch``, before it sets ``tpu``; the option namespace is
repaired where every argparse program turns it into its config (``convert_namespace_to_omegaconf``,
which each program calls right after parsing and before reading ``tpu``).
"""

import contextlib
import functools
import sys
import types
import torch

BF16 = torch.bfloat16


def xla_available() -> bool:
    """fairseq's own test: torch_xla.core.xla_model imported in fairseq.utils (a TPU host)."""
    from fairseq import utils

    return getattr(utils, "xm", None) is not None


def bf16_autocast_wanted(common) -> bool:
    """``--bf16`` (not ``--memory-efficient-bf16``) outside a TPU: the run uses bf16 autocast."""
    return (
        bool(getattr(common, "bf16", False))
        and not getattr(common, "memory_efficient_bf16", False)
        and not getattr(common, "tpu", False)
    )


def repair_bf16_namespace(args) -> None:
    """Undo fairseq's ``--bf16`` implies ``--tpu`` where there is no TPU runtime."""
    if getattr(args, "bf16", False) and getattr(args, "tpu", False) and not xla_available():
        args.tpu = False


def autocast_device(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def check_bf16_device(device_type: str) -> None:
    from gpam_fairseq.options import GPAMConfigError

    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        raise GPAMConfigError(
            f"--bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0 or newer, e.g. A100, H100); "
            f"{name} has {major}.{minor}: use --fp16 or --amp on this GPU"
        )


def autocasting(forward, device_type: str):
    """``forward`` run under bf16 autocast."""

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=BF16):
            return forward(*args, **kwargs)

    autocast_forward.__wrapped_by_gpam__ = True
    return autocast_forward


@contextlib.contextmanager
def _weights_in_fp32(cfg):
    """fairseq's trainer reads ``common.bf16`` to cast the model to bf16, to build its
    ``FP16Optimizer`` and to cast float inputs to bf16; none of that applies to autocast."""
    cfg.common.bf16 = False
    try:
        yield
    finally:
        cfg.common.bf16 = True


def refuse_cpu_only_failures(cfg, cuda: bool) -> None:
    """One line (exit status 2) instead of fairseq's CUDA traceback or a silent fp32 run."""
    from gpam_fairseq.options import GPAMConfigError

    common = cfg.common
    if cuda or getattr(common, "tpu", False):
        return
    if common.fp16 and not common.memory_efficient_fp16 and not common.fp16_no_flatten_grads:
        raise GPAMConfigError(
            "--fp16 on a CPU: fairseq keeps its fp32 copy of the weights in one flat CUDA buffer; add "
            "--fp16-no-flatten-grads, or use --memory-efficient-fp16 or --bf16 (or train on a CUDA GPU)"
        )
    if common.amp:
        raise GPAMConfigError(
            "--amp needs a CUDA GPU: fairseq's --amp is CUDA fp16 autocast with a CUDA gradient scaler, "
            "which on a CPU would be switched off and train in fp32; use --bf16 (bf16 autocast) on a CPU"
        )


def _trainer_init(original):
    @functools.wraps(original)
    def __init__(self, cfg, *args, **kwargs):
        cuda = torch.cuda.is_available() and not cfg.common.cpu and not cfg.common.tpu
        refuse_cpu_only_failures(cfg, cuda)
        self._gpam_bf16_autocast = bf16_autocast_wanted(cfg.common)
        if not self._gpam_bf16_autocast:
            return original(self, cfg, *args, **kwargs)
        if cfg.distributed_training.ddp_backend == "fully_sharded":
            from gpam_fairseq.options import GPAMConfigError

            raise GPAMConfigError(
                "--bf16 with --ddp-backend fully_sharded: fairseq's FullyShardedDataParallel supports "
                "--fp16 only; use --fp16, or --bf16 with the default --ddp-backend"
            )
        check_bf16_device("cuda" if cuda else "cpu")
        with _weights_in_fp32(cfg):
            original(self, cfg, *args, **kwargs)
        self._criterion.forward = autocasting(self._criterion.forward, autocast_device(self.device))

    __init__.__wrapped_by_gpam__ = True
    return __init__


def _with_weights_in_fp32(original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if not getattr(self, "_gpam_bf16_autocast", False):
            return original(self, *args, **kwargs)
        with _weights_in_fp32(self.cfg):
            return original(self, *args, **kwargs)

    method.__wrapped_by_gpam__ = True
    return method


def _prepare_for_inference(original):
    @functools.wraps(original)
    def prepare_for_inference_(self, cfg):
        original(self, cfg)
        common = getattr(cfg, "common", None)
        # --memory-efficient-bf16 implies --bf16; at inference both mean bf16 autocast
        if common is not None and common.bf16 and not common.tpu and not xla_available():
            device_type = autocast_device(next(self.parameters()).device)
            check_bf16_device(device_type)
            self.gpam_autocast_dtype = BF16  # read by the generator and the scorer below

    prepare_for_inference_.__wrapped_by_gpam__ = True
    return prepare_for_inference_


def inference_autocast(models) -> contextlib.AbstractContextManager:
    """bf16 autocast if a model of the ensemble was prepared for ``--bf16`` inference."""
    for model in models:
        if getattr(model, "gpam_autocast_dtype", None) is not None:
            device_type = autocast_device(next(model.parameters()).device)
            return torch.autocast(device_type, dtype=model.gpam_autocast_dtype)
    return contextlib.nullcontext()


def _generator_generate(original):
    autocast_of = inference_autocast  # through the closure: the function gets fairseq's globals below

    def _generate(self, *args, **kwargs):
        with autocast_of(getattr(self.model, "models", [])):
            return original(self, *args, **kwargs)

    # torch.jit.script(SequenceGenerator(...)) compiles fairseq's own _generate (the source that
    # functools.wraps points to) but resolves its names through this function's globals: give it
    # those of fairseq's module, so that it scripts as it does without the plugin
    _generate = types.FunctionType(_generate.__code__, original.__globals__, _generate.__name__,
                                   _generate.__defaults__, _generate.__closure__)
    functools.update_wrapper(_generate, original)
    _generate.__wrapped_by_gpam__ = True
    return _generate


def _scorer_generate(original):
    @functools.wraps(original)
    def generate(self, models, *args, **kwargs):
        with inference_autocast(models):
            return original(self, models, *args, **kwargs)

    generate.__wrapped_by_gpam__ = True
    return generate


def _namespace_conversion(original):
    @functools.wraps(original)
    def convert_namespace_to_omegaconf(args):
        repair_bf16_namespace(args)
        return original(args)

    convert_namespace_to_omegaconf.__wrapped_by_gpam__ = True
    convert_namespace_to_omegaconf.__gpam_original__ = original
    return convert_namespace_to_omegaconf


def _wrap(owner, name: str, wrap) -> None:
    current = getattr(owner, name)
    if not getattr(current, "__wrapped_by_gpam__", False):
        setattr(owner, name, wrap(current))


def install() -> None:
    """Called when gpam_fairseq is imported; installing twice changes nothing."""
    from fairseq.dataclass import utils as dataclass_utils
    from fairseq.models.fairseq_model import BaseFairseqModel
    from fairseq.sequence_generator import SequenceGenerator
    from fairseq.sequence_scorer import SequenceScorer
    from fairseq.trainer import Trainer

    original = dataclass_utils.convert_namespace_to_omegaconf
    original = getattr(original, "__gpam_original__", original)
    _wrap(dataclass_utils, "convert_namespace_to_omegaconf", _namespace_conversion)
    converted = dataclass_utils.convert_namespace_to_omegaconf
    # the programs (fairseq_cli.train, .generate, ...) and fairseq's modules imported the function
    # by name before --user-dir was imported: give each of them the wrapped one
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("convert_namespace_to_omegaconf") is original:
            module.convert_namespace_to_omegaconf = converted

    _wrap(Trainer, "__init__", _trainer_init)
    _wrap(Trainer, "_build_optimizer", _with_weights_in_fp32)
    _wrap(Trainer, "_fp_convert_sample", _with_weights_in_fp32)
    _wrap(BaseFairseqModel, "prepare_for_inference_", _prepare_for_inference)
    _wrap(SequenceGenerator, "_generate", _generator_generate)
    _wrap(SequenceScorer, "generate", _scorer_generate)

