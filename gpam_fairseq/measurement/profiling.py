"""What a forward + backward pass costs a GPU, counted deterministically on any device.

At the sizes of most NMT and LM training runs a GPU is launch-bound: every extra kernel
costs about as much time as its arithmetic. Timings on a shared machine are noisy; the
number of kernels a pass launches, and the bytes autograd keeps alive for the backward
pass, are not. :class:`CostCounter` measures both, on the CPU as well as on a GPU:

* **kernels**: every ATen operation that reaches the dispatcher counts one, except views
  and metadata operations (``view``, ``transpose``, ``expand``, ``detach``, ``empty``, ...),
  which launch nothing. Two CPU-specific decompositions are undone so that the count is
  the one a GPU would see: ``F.scaled_dot_product_attention`` counts one forward and one
  backward kernel whatever the CPU runs inside it (a GPU runs one fused flash or
  memory-efficient kernel each way; the CPU falls back to a dozen unfused operations when
  dropout is on), and ``F.dropout`` counts as CUDA's one fused ``native_dropout`` kernel
  (the CPU runs ``bernoulli_``, ``div_`` and ``mul``).
* **saved bytes**: the distinct storages that autograd saves for the backward pass during
  the forward pass (``torch.autograd.graph.saved_tensors_hooks``), without the model's
  parameters, which live anyway. A fused attention call is accounted as a GPU kernel saves:
  its inputs, its output, a float32 log-sum-exp per query row and the mask it was given.
* **host syncs**: ``.item()``-like reads of a device value (``_local_scalar_dense``), which
  stall a GPU's queue.

With a :class:`SavedTensorLedger` (``CostCounter(ledger=...)``, ``count_pass(..., ledger=...)``)
every saved tensor is also recorded with its role, origin and copies: the memory ledger of
``scripts/benchmark_memory.py`` (:mod:`gpam_fairseq.measurement.memory_ledger`).

The outputs of the counted pass are the real ones (the fused attention is computed by
``F.scaled_dot_product_attention`` itself, and its backward by autograd through it), so a
counted pass can also be checked for correctness.
"""

from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpam_fairseq.attention.functional import inverse_permutation, physical_order
from gpam_fairseq.attention.fused import restored_rng, rng_state

aten = torch.ops.aten

# Not views by their schema, but they launch no kernel either: allocation and metadata.
NOT_KERNELS = frozenset(
    {
        aten._unsafe_view.default,
        aten.empty.memory_format,
        aten.empty_like.default,
        aten.empty_strided.default,
        aten.new_empty.default,
        aten.new_empty_strided.default,
        aten.set_.source_Storage_storage_offset,
        aten.resize_.default,
        aten.is_same_size.default,
        aten._has_compatible_shallow_copy_type.default,
        aten.promote_types.default,
    }
)
HOST_SYNCS = frozenset({aten._local_scalar_dense.default})
SDPA_FORWARD = "fused_attention_forward"
SDPA_BACKWARD = "fused_attention_backward"


def is_kernel(func) -> bool:
    return not getattr(func, "is_view", False) and func not in NOT_KERNELS


class CostCounter:
    """Counts kernels (forward and backward apart), host syncs and saved bytes.

    Usage::

        counter = CostCounter(exclude=model.parameters())
        with counter.forward():
            loss = model(x).sum()
        with counter.backward():
            loss.backward()
        counter.kernels_forward, counter.kernels_backward, counter.saved_bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), ledger: Optional["SavedTensorLedger"] = None):
        self.excluded_storages = {p.untyped_storage().data_ptr() for p in exclude}
        self.ledger = ledger
        self.ops: Dict[str, Counter] = {"forward": Counter(), "backward": Counter()}
        self.host_syncs = 0
        self.saved_storages: Dict[int, int] = {}
        self.phase: Optional[str] = None
        self.suppressed = 0  # > 0 inside a fused call: its CPU internals are not a GPU's

    # ------------------------------------------------------------------ results

    @property
    def kernels_forward(self) -> int:
        return sum(self.ops["forward"].values())

    @property
    def kernels_backward(self) -> int:
        return sum(self.ops["backward"].values())

    @property
    def kernels(self) -> int:
        return self.kernels_forward + self.kernels_backward

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved_storages.values())

    # ------------------------------------------------------------------ recording

    def record(self, name: str) -> None:
        if self.phase is not None and not self.suppressed:
            self.ops[self.phase][name] += 1

    @contextmanager
    def quiet(self):
        """Nothing inside is counted (the CPU's inside of one GPU kernel)."""
        self.suppressed += 1
        try:
            yield
        finally:
            self.suppressed -= 1

    def _pack(self, tensor: torch.Tensor):
        if self.phase == "forward" and not self.suppressed:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.excluded_storages:
                self.saved_storages[ptr] = storage.nbytes()
                if self.ledger is not None:
                    self.ledger.saved(tensor)
        return tensor

    def tag(self, tensor: torch.Tensor, role: str, weak: bool = False) -> None:
        """Give a tensor's storage its role in the ledger (the fused call's own tensors);
        ``weak``: unless its origin inside a daGPAM mechanism gives it one."""
        if self.ledger is not None:
            self.ledger.tag(tensor, role, weak)

    @contextmanager
    def _counting(self, phase: str):
        self.phase = phase
        try:
            with _gpu_decompositions(self), _CountKernels(self):
                if phase == "forward":
                    with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                        yield self
                else:
                    yield self
        finally:
            self.phase = None

    def forward(self):
        return self._counting("forward")

    def backward(self):
        return self._counting("backward")


class _CountKernels(TorchDispatchMode):
    def __init__(self, counter: CostCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS and not self.counter.suppressed:
            self.counter.host_syncs += 1
        if is_kernel(func):
            self.counter.record(str(func.overloadpacket.__name__))
        out = func(*args, **(kwargs or {}))
        ledger = self.counter.ledger
        if ledger is not None and self.counter.phase == "forward" and not self.counter.suppressed:
            if not getattr(func, "is_view", False):
                ledger.produced(func, out, (args, kwargs))
        return out


class _FusedAttention(torch.autograd.Function):
    """One fused attention kernel each way, as on a GPU; saves what such a kernel saves."""

    @staticmethod
    def forward(ctx, counter, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        counter.record(SDPA_FORWARD)
        ctx.counter = counter
        ctx.options = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        ctx.rng = rng_state(q.device) if dropout_p > 0 else None
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool:
            counter.record("boolean_mask_to_bias")  # SDPA turns a boolean mask into a float one first
        with counter.quiet():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, **ctx.options)
            out = _gpu_output_layout(out, q, masked=isinstance(attn_mask, torch.Tensor))
        # a fused kernel saves q, k, v, its output, a float32 log-sum-exp per query row and
        # its mask (the memory-efficient kernel's bias); the flash kernel's dropout seed is free
        logsumexp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.has_mask = isinstance(attn_mask, torch.Tensor)
        for t in (q, k, v):
            counter.tag(t, ROLE_PROJECTIONS, weak=True)
        counter.tag(out, ROLE_SDPA_OUT)
        counter.tag(logsumexp, ROLE_LSE)
        if ctx.has_mask:
            counter.tag(attn_mask, ROLE_MASKS)
        saved = (q, k, v, out, logsumexp) + ((attn_mask,) if ctx.has_mask else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        counter = ctx.counter
        counter.record(SDPA_BACKWARD)
        saved = ctx.saved_tensors  # unpacked once, as a kernel's backward node does
        q, k, v = saved[:3]
        attn_mask = saved[5] if ctx.has_mask else None
        needs = ctx.needs_input_grad[1:4]
        with counter.quiet(), torch.enable_grad(), restored_rng(q.device, ctx.rng):
            inputs = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            out = F.scaled_dot_product_attention(*inputs, attn_mask, **ctx.options)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
            # the CUDA kernels write each gradient laid out like its input
            dq, dk, dv = (_laid_out(next(grads), physical_order(t)) if n else None for t, n in zip((q, k, v), needs))
        return None, dq, dk, dv, None, None, None, None, None


def _gpu_output_layout(out: torch.Tensor, q: torch.Tensor, masked: bool) -> torch.Tensor:
    """``out`` laid out in memory as a CUDA kernel lays it out (the CPU's choice differs with
    dropout), so that what follows copies exactly what it would copy on a GPU: the
    memory-efficient kernel (taken with a mask tensor) writes (B, Tq, H, d); FlashAttention
    (no mask) writes its output like its query."""
    return _laid_out(out, [0, 2, 1, 3] if masked else physical_order(q))


def _laid_out(x: torch.Tensor, order) -> torch.Tensor:
    """A copy of ``x`` whose dimensions lie in memory in ``order``, outermost first."""
    shaped = torch.empty([x.size(i) for i in order], dtype=x.dtype, device=x.device)
    return shaped.permute(inverse_permutation(order)).copy_(x)


@contextmanager
def _gpu_decompositions(counter: CostCounter):
    """Route SDPA and dropout to what a GPU runs (see the module docstring).

    The two functions are replaced in ``torch.nn.functional`` for the duration, which also
    reaches the calls that torch's own ``multi_head_attention_forward`` (stock fairseq's
    self-attention) and fairseq's ``FairseqDropout`` make through that module."""
    sdpa, dropout = F.scaled_dot_product_attention, F.dropout

    def fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if counter.suppressed:
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return _FusedAttention.apply(counter, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    F.scaled_dot_product_attention, F.dropout = fused_sdpa, fused_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = sdpa, dropout


def count_pass(forward, exclude: Iterable[torch.Tensor] = (), backward: bool = True,
               ledger: Optional["SavedTensorLedger"] = None) -> CostCounter:
    """Run ``forward()`` (which returns a tensor) and, if asked, a backward pass from its sum,
    under a :class:`CostCounter` (and its ``ledger``, when given)."""
    counter = CostCounter(exclude, ledger)
    with counter.forward():
        out = forward()
        loss = out.float().sum() if backward else None
    if backward:
        with counter.backward():
            loss.backward()
    return counter


# ----------------------------------------------------------------------------- the ledger

ROLE_SDPA_OUT = "fused attention outputs"
ROLE_LSE = "log-sum-exp"
ROLE_MASKS = "padding and causal masks"
ROLE_DROPOUT = "dropout masks"
ROLE_PROJECTIONS = "projections (q, k, v)"
ROLE_Q_NEG = "Q−"
ROLE_STACKED = "stacked queries (Q+ copy, Q−)"
ROLE_COMBINATION = "combination inputs and outputs"
ROLE_MAPS = "explicit path: scores, maps, their products"
ROLE_COPIES = "copies (layouts, merged heads)"
ROLE_ATTENTION_OTHER = "attention, other"
ROLE_MODEL = "rest of the model (embeddings, layer inputs, feed-forward, norms, loss)"
ROLES = (ROLE_PROJECTIONS, ROLE_Q_NEG, ROLE_STACKED, ROLE_SDPA_OUT, ROLE_LSE, ROLE_MAPS, ROLE_DROPOUT, ROLE_MASKS,
         ROLE_COMBINATION, ROLE_COPIES, ROLE_ATTENTION_OTHER, ROLE_MODEL)
COPY_OPS = frozenset({"clone", "copy_", "_to_copy", "stack", "cat", "contiguous", "repeat", "expand_copy"})
GEMM_OPS = frozenset({"addmm", "mm", "matmul", "linear"})
EXPLICIT_OPS = frozenset({"bmm", "baddbmm", "_softmax", "softmax", "masked_fill", "where", "div"})
ATTENTION_MODULES = ("self_attn", "encoder_attn")
ALLOCATIONS = frozenset({aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                         aten.new_empty.default, aten.new_empty_strided.default})


def _tensors(tree):
    """The tensors in a nest of tuples, lists and dicts (an op's arguments or outputs)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


class SavedTensorLedger:
    """What one forward pass keeps for the backward pass, tensor by tensor, each with a role.

    Fed by :class:`CostCounter` (``CostCounter(ledger=...)``): every tensor that autograd saves
    (``torch.autograd.graph.saved_tensors_hooks``) is recorded with its storage, and every
    kernel of the forward pass records which storages it wrote (the first kernel that writes
    one is its origin), from which module and from which inputs. Storages are counted once,
    however many backward nodes save them ("shared": saved more than once, counted once); a
    saved storage made by a copy (``clone``, ``copy_``, ``stack``, ``cat``, ...) of another
    saved storage is a **copy**: its duplicated bytes are reported apart.

    A storage's role follows from its origin, in this order: tags given by the fused attention
    call (its output, log-sum-exp and mask); a boolean ``native_dropout`` output (dropout
    masks); any other boolean tensor (padding and causal masks); then, inside an attention
    module (``self_attn``, ``encoder_attn``), the origin op: ``bmm``, softmax, ``where``,
    ``masked_fill`` are the explicit path's scores, maps and products; GEMMs are projections
    (Q− inside the mechanism); ``stack``/``cat`` inside the mechanism the stacked queries;
    other copies are copies; ``lerp``/``addcmul``/``sub`` inside the mechanism the
    combination. Everything made outside an attention module is the rest of the model.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None):
        self.names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self.origin: Dict[int, tuple] = {}  # storage -> (op, module, input storages)
        self.entries: Dict[int, dict] = {}  # saved storage -> its record
        self.tags: Dict[int, str] = {}
        self.weak_tags: Dict[int, str] = {}

    # ------------------------------------------------------------------ recording

    def _module(self) -> str:
        """The innermost named module whose code is running (from the Python stack)."""
        import sys

        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in self.names:
                return self.names[id(owner)]
            frame = frame.f_back
        return ""

    def tag(self, tensor: torch.Tensor, role: str, weak: bool) -> None:
        ptr = tensor.untyped_storage().data_ptr()
        (self.weak_tags if weak else self.tags)[ptr] = role
        if ptr not in self.origin:
            self.origin[ptr] = ("fused attention", self._module(), [])

    def produced(self, func, out, args) -> None:
        """Record the storages ``func`` wrote: an allocation forgets a storage's origin (its
        address may be reused), an op that writes into an existing tensor (in place, ``out=``)
        becomes the origin of a fresh one, any other op the origin of its outputs."""
        mutates = func._schema.is_mutable
        allocation = func in ALLOCATIONS
        op = str(func.overloadpacket.__name__)
        inputs = None
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if allocation:
                self.origin.pop(ptr, None)
                continue
            if (mutates and ptr in self.origin) or t.untyped_storage().nbytes() == 0:
                continue
            if inputs is None:
                inputs = [(x.untyped_storage().data_ptr(), x.numel() * x.element_size()) for x in _tensors(args)
                          if x.untyped_storage().data_ptr() != ptr]
            self.origin[ptr] = (op, self._module(), inputs)

    def saved(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        entry = self.entries.get(ptr)
        if entry is not None:
            entry["saves"] += 1
            return
        self.entries[ptr] = dict(bytes=storage.nbytes(), saves=1, shape=tuple(tensor.shape),
                                 dtype=str(tensor.dtype).replace("torch.", ""), saver=self._module())

    # ------------------------------------------------------------------ results

    def role(self, ptr: int, entry: dict) -> str:
        if ptr in self.tags:
            return self.tags[ptr]
        op, module, _ = self.origin.get(ptr, ("", entry["saver"], []))
        if entry["dtype"] == "bool":
            return ROLE_DROPOUT if op == "native_dropout" else ROLE_MASKS
        in_mechanism = "mechanism" in module.split(".")
        if ptr in self.weak_tags and not in_mechanism:
            return self.weak_tags[ptr]
        if not any(part in module.split(".") for part in ATTENTION_MODULES):
            return ROLE_MODEL
        if op in EXPLICIT_OPS:
            return ROLE_MAPS
        if op in GEMM_OPS or (op == "relu" and in_mechanism):
            return ROLE_Q_NEG if in_mechanism else ROLE_PROJECTIONS
        if op in ("stack", "cat") and in_mechanism:
            return ROLE_STACKED
        if op in COPY_OPS:
            return ROLE_COPIES
        if op in ("lerp", "addcmul", "sub", "add", "mul") and in_mechanism:
            return ROLE_COMBINATION
        return ROLE_ATTENTION_OTHER

    def duplicated_bytes(self, ptr: int) -> int:
        """Bytes of a saved storage made by copying other saved storages (0 for the rest)."""
        op, _, inputs = self.origin.get(ptr, ("", "", []))
        if op not in COPY_OPS:
            return 0
        return min(self.entries[ptr]["bytes"], sum(n for p, n in inputs if p in self.entries and p != ptr))

    def rows(self) -> List[dict]:
        """One row per saved storage, largest first."""
        out = []
        for ptr, e in self.entries.items():
            op, module, _ = self.origin.get(ptr, ("(made before the pass)", "", []))
            out.append(dict(role=self.role(ptr, e), bytes=e["bytes"], duplicated=self.duplicated_bytes(ptr),
                            saves=e["saves"], shape="×".join(map(str, e["shape"])), dtype=e["dtype"], origin=op,
                            module=module, saver=e["saver"]))
        return sorted(out, key=lambda r: (-r["bytes"], r["module"], r["origin"]))

    def by_role(self) -> Dict[str, dict]:
        """role -> {bytes, duplicated, tensors, shared (storages saved more than once)}."""
        totals = {r: dict(bytes=0, duplicated=0, tensors=0, shared=0) for r in ROLES}
        for r in self.rows():
            t = totals.setdefault(r["role"], dict(bytes=0, duplicated=0, tensors=0, shared=0))
            t["bytes"] += r["bytes"]
            t["duplicated"] += r["duplicated"]
            t["tensors"] += 1
            t["shared"] += r["saves"] > 1
        return totals

    @property
    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries.values())
