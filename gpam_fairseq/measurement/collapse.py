"""Rank collapse and gradient diagnostics per layer, for one or several attention types.

For every layer l of a model (or of a pure attention stack) it measures, on one batch:

* the rank-collapse residual ratio ||res(X_l)|| / ||X_l|| of the layer's output X_l (T x d per
  sentence), res(X) = X - 1 x^T with x minimising the norm (Dong et al. 2021). Primary norm:
  Frobenius, whose minimiser is the token mean. ``--norm l1inf``: Dong et al.'s composite
  ||A||_{1,inf} = sqrt(||A||_1 ||A||_inf); it has no closed-form minimiser, so x is the best
  of the coordinate-wise median (which minimises the ||.||_1 factor exactly), the token mean
  and 0, an upper bound on the exact minimum (and the ratio is <= 1);
* the mean pairwise cosine similarity of the token representations (i != j);
* the gradient norm ||dL/dW_Q|| of the loss with respect to that layer's query weights
  (``self_attn.q_proj.weight``). Models: their own cross-entropy on the batch. Pure stacks:
  L = 1/2 mean((X_L - Z)^2) with a fixed random target Z.

Layer 0 is the input of the first layer (embeddings); it has no gradient norm. Ratios are
averaged over the sentences of the batch (padding excluded), and every row of the CSV is one
(attention type, seed, stack, layer). The PNG has three panels (residual, cosine, gradient
norm against the layer), one line per attention type (mean over seeds).

The lambda map (``--lambda-pos LIST --lambda-neg LIST``, with ``--pure-attention`` or ``--arch ...
--random-init``): daGPAM measured at every point of the product grid, per W_Q- initialisation
(``--neg-query-inits``), the other ``--attention-types`` once as references; points that break
the row-sum rule (lambda- >= 1 + lambda+) are refused in one line before anything runs (or
dropped with ``--skip-invalid``). Besides PREFIX.csv (with ``lambda_pos``, ``lambda_neg``,
``neg_query_init`` columns) it writes PREFIX_map.csv (geometric means over seeds per point and
layer) and PREFIX_map.png (heat maps over the grid: residual ratio at ``--map-layers``, the first
layer that has collapsed to float64's floor, layer 1's ||dL/dW_Q||), and PREFIX.png draws the
per-layer curves of the ``--mark`` points only. ``--trained-lambda PATH...`` reads the lambdas
of trainable-lambda checkpoints (lambda = softplus(theta), converted by daGPAM's own module),
per module or per head, marks them on the heat maps and writes PREFIX_trained_lambda.csv.

    # the map over a grid, both W_Q- initialisations, with trained lambdas marked on it
    python scripts/analyze_collapse.py --pure-attention --depth 8 --seeds 0,1,2,3,4 \
        --lambda-pos 0,0.2,0.5,1,2 --lambda-neg 0,0.2,0.5,0.9,0.99,1.9,2.9 --skip-invalid \
        --neg-query-inits neg_identity,random --trained-lambda results/ptb_controlled --out-prefix results/map

The command line is ``scripts/analyze_collapse.py`` (:func:`main`); the PTB controlled
experiment (``examples/ptb/controlled/run_controlled.py``) calls :func:`run`, :func:`write_csv`
and :func:`plot` on its trained checkpoints.

    # trained checkpoints (their attention type is read from them), on a data split
    python scripts/analyze_collapse.py --checkpoint ckpt/softmax/checkpoint_best.pt ckpt/dagpam/checkpoint_best.pt \\
        --data-bin data/ptb/data-bin --split valid --out-prefix results/collapse
    # an architecture at random initialisation, several mechanisms, same seed, random tokens
    python scripts/analyze_collapse.py --arch transformer_lm_gpam --random-init --fairseq-args "--decoder-layers 15" \\
        --attention-types softmax,dagpam,diff,coda,nap,unnormalized --out-prefix results/init
    # stacks of attention only (no residual, no FFN): the setting of Dong et al.
    python scripts/analyze_collapse.py --pure-attention --depth 12 --dim 64 --tokens 32 --seeds 1,2,3 \\
        --attention-types softmax,dagpam --out-prefix results/pure
"""

import argparse
import csv
import json
import logging
import math
import os
import shlex
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import gpam_fairseq  # noqa: F401  (registers the models)
from gpam_fairseq.fairseq_glue.tools import make_dictionary, parse_training_args, task_without_data
from gpam_fairseq.options import ATTENTION_TYPES, DEFAULTS, NEG_QUERY_INITS, GPAMConfigError, GPAMOptions

FIELDS = ["label", "attention_type", "lambda_pos", "lambda_neg", "neg_query_init", "seed", "stack", "layer", "norm",
          "residual_ratio", "mean_cosine", "grad_norm_wq", "state_rms"]


# ----------------------------------------------------------------------------- metrics


def residual_ratio(x: torch.Tensor, norm: str = "fro") -> float:
    """||X - 1 x^T|| / ||X|| for one sentence X (T x d); x minimises the norm (see module doc)."""
    x = x.double().contiguous()  # (median of a stride-0 expanded view is wrong in torch)
    if not torch.isfinite(x).all():
        return float("nan")  # the stack overflowed (unnormalised attention can)
    if norm == "fro":
        res = x - x.mean(dim=0, keepdim=True)
        return (res.norm() / x.norm()).item() if x.norm() > 0 else 0.0
    if norm == "l1inf":

        def composite(a):
            return torch.sqrt(a.abs().sum(0).max() * a.abs().sum(1).max())

        den = composite(x)
        if den == 0:
            return 0.0
        # no closed-form minimiser: the best of three candidates, an upper bound on the minimum
        candidates = (x.median(dim=0, keepdim=True).values, x.mean(dim=0, keepdim=True), torch.zeros_like(x[:1]))
        return min(composite(x - c).item() for c in candidates) / den.item()
    raise ValueError(f"--norm: unknown norm {norm!r}; choose from fro, l1inf")


def mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over the pairs i != j of the rows of X (T x d)."""
    t = x.size(0)
    if t < 2 or not torch.isfinite(x).all():
        return float("nan")
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    sim = u @ u.t()
    return ((sim.sum() - sim.diagonal().sum()) / (t * (t - 1))).item()


def batch_metrics(states: torch.Tensor, spans: Sequence[tuple], norm: str):
    """(mean residual ratio, mean cosine, root mean square of the entries) over the sentences of
    states (T, B, d); sentence b occupies the positions spans[b] = (start, end) (fairseq left-pads
    sources, right-pads targets). The RMS says how large the states are: a signed map whose rows
    sum to less than one shrinks them layer after layer, which the ratios, being relative, hide."""
    ratios, cosines, squares, count = [], [], 0.0, 0
    for b, (start, end) in enumerate(spans):
        x = states[start:end, b]
        ratios.append(residual_ratio(x, norm))
        cosines.append(mean_cosine(x))
        squares += x.double().pow(2).sum().item()
        count += x.numel()
    n = len(ratios)
    return sum(ratios) / n, sum(cosines) / n, (squares / count) ** 0.5


# ----------------------------------------------------------------------------- fairseq models


def stacks_of(model) -> Dict[str, list]:
    """{'encoder': layers, 'decoder': layers} present in the model."""
    out = {}
    for name in ("encoder", "decoder"):
        part = getattr(model, name, None)
        layers = getattr(part, "layers", None)
        if layers is not None and len(layers) > 0:
            out[name] = list(layers)
    return out


def measure_model(model, sample, pad_idx: int, norm: str = "fro") -> List[dict]:
    """One forward/backward pass over ``sample`` with hooks on every layer."""
    model.eval()  # no dropout; gradients are still computed
    model.zero_grad(set_to_none=True)
    captured: Dict[str, list] = {}
    handles = []
    for stack, layers in stacks_of(model).items():
        captured[stack] = [None] * (len(layers) + 1)

        def pre_hook(module, args, stack=stack):
            captured[stack][0] = args[0].detach()

        def make_hook(i, stack=stack):
            def hook(module, args, output):
                captured[stack][i] = (output[0] if isinstance(output, tuple) else output).detach()

            return hook

        handles.append(layers[0].register_forward_pre_hook(pre_hook))
        for i, layer in enumerate(layers, start=1):
            handles.append(layer.register_forward_hook(make_hook(i)))
    try:
        with torch.enable_grad():
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
            target = sample["target"]
            loss = torch.nn.functional.nll_loss(
                lprobs.reshape(-1, lprobs.size(-1)), target.reshape(-1), ignore_index=pad_idx, reduction="mean"
            )
            loss.backward()
    finally:
        for h in handles:
            h.remove()

    rows = []
    for stack, layers in stacks_of(model).items():
        tokens = sample["net_input"]["src_tokens"] if stack == "encoder" or "prev_output_tokens" not in sample["net_input"] \
            else sample["net_input"]["prev_output_tokens"]
        keep = tokens.ne(pad_idx)
        spans = []
        for b in range(tokens.size(0)):
            idx = keep[b].nonzero().flatten()
            spans.append((int(idx[0]), int(idx[-1]) + 1))
        for i, states in enumerate(captured[stack]):
            ratio, cos, rms = batch_metrics(states, spans, norm)
            grad = None
            if i > 0:
                g = layers[i - 1].self_attn.q_proj.weight.grad
                grad = g.norm().item() if g is not None else float("nan")
            rows.append(dict(stack=stack, layer=i, norm=norm, residual_ratio=ratio, mean_cosine=cos, grad_norm_wq=grad,
                             state_rms=rms))
    return rows


def random_sample(task, batch: int, tokens: int, seed: int, language_model: bool) -> dict:
    """Random tokens from the dictionaries' ordinary symbols (no padding)."""
    g = torch.Generator().manual_seed(seed)
    src_dict = task.source_dictionary or task.target_dictionary
    tgt_dict = task.target_dictionary
    draw = lambda d, n: torch.randint(d.nspecial, len(d), (batch, n), generator=g)  # noqa: E731
    if language_model:
        seq = draw(tgt_dict, tokens + 1)
        return {"net_input": {"src_tokens": seq[:, :-1], "src_lengths": torch.full((batch,), tokens)}, "target": seq[:, 1:]}
    src = draw(src_dict, tokens)
    src[:, -1] = src_dict.eos()
    tgt = draw(tgt_dict, tokens)
    tgt[:, -1] = tgt_dict.eos()
    prev = torch.cat([torch.full((batch, 1), tgt_dict.eos()), tgt[:, :-1]], dim=1)
    return {
        "net_input": {"src_tokens": src, "src_lengths": torch.full((batch,), tokens), "prev_output_tokens": prev},
        "target": tgt,
    }


def data_sample(task, split: str, batch: int) -> dict:
    """The first ``batch`` examples of a data split, collated as fairseq does."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    n = min(batch, len(dataset))
    if n == 0:
        raise SystemExit(f"--split {split}: the split is empty in the data directory")
    return dataset.collater([dataset[i] for i in range(n)])


def load_checkpoint(path: str, data_bin: Optional[str]):
    from gpam_fairseq.checkpointing.checkpoints import load_models

    overrides = {"data": data_bin} if data_bin else None
    models, cfg, task = load_models([path], arg_overrides=overrides)
    attention_type = getattr(cfg.model, "attention_type", "softmax") or "softmax"
    return models[0], task, str(attention_type)


def build_random_model(arch: str, task_name: str, attention_type: str, fairseq_args: Sequence[str], data_bin: Optional[str],
                       vocab: int, seed: int):
    """The model fairseq-train would build for these flags, at its random initialisation (with
    the data folder's dictionaries, else one dictionary of ``vocab`` symbols)."""
    from fairseq import tasks

    cli = ["--task", task_name, "--arch", arch, "--attention-type", attention_type, "--seed", str(seed), *fairseq_args]
    _, cfg = parse_training_args(cli, data=data_bin or "/nonexistent-data")
    task = tasks.setup_task(cfg.task) if data_bin else task_without_data(cfg, make_dictionary(vocab))
    torch.manual_seed(seed)
    return task.build_model(cfg.model), task


# ----------------------------------------------------------------------------- pure attention stacks


def pure_stack(attention_type: str, depth: int, dim: int, heads: int, seed: int, dtype=torch.float64,
               options: Optional[GPAMOptions] = None):
    """``depth`` self-attention modules, no residual, no FFN, no norm. The projections
    (W_Q, W_K, W_V, W_O) are those of a softmax stack with the same seed, so mechanisms
    differ only in what is specific to them (a random W_Q- is drawn from a seed of its own
    layer, the same for every lambda). ``options``: the GPAM options of the stack (lambda+,
    lambda-, the W_Q- initialisation); default: the defaults of ``attention_type``."""
    from gpam_fairseq.modules.transformer import build_attention

    options = options or GPAMOptions(attention_type=attention_type)
    if options.attention_type != attention_type:
        raise ValueError(f"pure_stack: options are for {options.attention_type!r}, not {attention_type!r}")
    torch.manual_seed(seed)
    reference = [build_attention("enc_self", GPAMOptions(attention_type="softmax"), dim, heads, self_attention=True)
                 for _ in range(depth)]
    layers = []
    for l, ref in enumerate(reference, start=1):
        torch.manual_seed(seed * 1000 + l)
        layer = build_attention("enc_self", options, dim, heads, layer_index=l, self_attention=True)
        missing, unexpected = layer.load_state_dict(ref.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("mechanism.") for k in missing)
        layers.append(layer.to(dtype).eval())
    return layers


def measure_pure(attention_type: str, depth: int, dim: int, heads: int, tokens: int, batch: int, seed: int,
                 norm: str = "fro", options: Optional[GPAMOptions] = None) -> List[dict]:
    dtype = torch.float64  # ratios fall to ~1e-16 within a few layers: fp32 would floor at ~1e-7
    layers = pure_stack(attention_type, depth, dim, heads, seed, dtype, options)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, batch, dim, generator=g, dtype=dtype)
    target = torch.randn(tokens, batch, dim, generator=g, dtype=dtype)
    states = [x]
    with torch.enable_grad():
        h = x
        for layer in layers:
            h, _ = layer(h, h, h, need_weights=False)
            states.append(h.detach())
        loss = 0.5 * (h - target).pow(2).mean()
        loss.backward()
    spans = [(0, tokens)] * batch
    rows = []
    for i, s in enumerate(states):
        ratio, cos, rms = batch_metrics(s, spans, norm)
        grad = layers[i - 1].q_proj.weight.grad.norm().item() if i > 0 else None
        rows.append(dict(stack="pure", layer=i, norm=norm, residual_ratio=ratio, mean_cosine=cos, grad_norm_wq=grad,
                         state_rms=rms))
    return rows


# ----------------------------------------------------------------------------- the lambda grid


@dataclass(frozen=True)
class Setting:
    """One attention setting to measure: a type, and for daGPAM its lambdas and W_Q- start
    (None: the type's defaults, or whatever a checkpoint / --fairseq-args says)."""

    attention_type: str
    lambda_pos: Optional[float] = None
    lambda_neg: Optional[float] = None
    neg_query_init: Optional[str] = None
    label: str = ""

    def options(self) -> GPAMOptions:
        """The GPAM options of a pure stack for this setting."""
        given = {k: v for k, v in (("lambda_pos", self.lambda_pos), ("lambda_neg", self.lambda_neg),
                                   ("neg_query_init", self.neg_query_init)) if v is not None}
        return GPAMOptions(attention_type=self.attention_type, **given)

    def fairseq_flags(self) -> List[str]:
        """The fairseq-train flags that set this setting (after --fairseq-args, so they win)."""
        flags = []
        for value, flag in ((self.lambda_pos, "--gpam-lambda-pos"), (self.lambda_neg, "--gpam-lambda-neg"),
                            (self.neg_query_init, "--gpam-neg-query-init")):
            if value is not None:
                flags += [flag, repr(value) if isinstance(value, float) else value]
        return flags

    def columns(self) -> dict:
        return dict(lambda_pos=self.lambda_pos, lambda_neg=self.lambda_neg, neg_query_init=self.neg_query_init)


def parse_floats(text: str, flag: str) -> List[float]:
    """A comma list of finite numbers >= 0 (a lambda list), in the order given, without repeats."""
    values = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            v = float(item)
        except ValueError:
            raise SystemExit(f"{flag}: expected a comma list of numbers >= 0, got {item.strip()!r}") from None
        if not math.isfinite(v) or v < 0:
            raise SystemExit(f"{flag}: every value must be a finite number >= 0, got {item.strip()!r}")
        if v not in values:
            values.append(v)
    if not values:
        raise SystemExit(f"{flag}: empty list")
    return values


def breaks_row_sum(lambda_pos: float, lambda_neg: float) -> bool:
    """Whether P_G's rows would sum to 1 + lambda+ - lambda- <= 0 (refused, as --gpam-lambda-neg is)."""
    return lambda_neg >= 1 + lambda_pos


def lambda_grid(pos: Sequence[float], neg: Sequence[float], skip_invalid: bool = False) -> List[Tuple[float, float]]:
    """The product grid of (lambda+, lambda-), lambda+ first. Points that break the row-sum rule
    (lambda- >= 1 + lambda+) are refused by name before anything is measured, in one line;
    ``skip_invalid`` drops them instead (the valid region of a rectangular grid is a triangle)."""
    points = [(p, n) for p in pos for n in neg]
    invalid = [(p, n) for p, n in points if breaks_row_sum(p, n)]
    if invalid and not skip_invalid:
        named = ", ".join(f"(lambda+ {p:g}, lambda- {n:g})" for p, n in invalid)
        raise GPAMConfigError(
            f"--lambda-neg: {len(invalid)} grid point(s) break the row-sum rule lambda- < 1 + lambda+ (rows of P_G "
            f"would sum to 1 + lambda+ - lambda- <= 0): {named}; remove them from --lambda-pos/--lambda-neg, or pass "
            f"--skip-invalid to measure only the valid points")
    valid = [pt for pt in points if pt not in invalid]
    if not valid:
        raise GPAMConfigError("--lambda-neg: no grid point satisfies lambda- < 1 + lambda+; lower --lambda-neg")
    return valid


def grid_label(lambda_pos: float, lambda_neg: float, neg_query_init: Optional[str]) -> str:
    return f"dagpam l+={lambda_pos:g} l-={lambda_neg:g}" + (f" {neg_query_init}" if neg_query_init else "")


def settings_for(types: Sequence[str], grid: Optional[List[Tuple[float, float]]],
                 inits: Optional[Sequence[str]]) -> List[Setting]:
    """What to measure: every type of ``types``; daGPAM once per grid point (without a grid:
    once, with the lambdas it is configured with) and per W_Q- initialisation of ``inits``
    (None: the one it is configured with); the other types once, as references."""
    out = []
    for t in types:
        if t != "dagpam":
            out.append(Setting(t, label=t))
            continue
        for init in inits or [None]:
            if grid is None:
                out.append(Setting(t, neg_query_init=init, label=t if init is None else f"{t} {init}"))
            else:
                out.extend(Setting(t, p, n, init, grid_label(p, n, init)) for p, n in grid)
    return out


def default_marks(grid: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The points whose per-layer curves are drawn: the defaults (0.2, 0.2), the row-sum-1
    diagonal lambda+ = lambda-, and for every lambda+ the largest lambda- of the grid (the one
    closest to its limit 1 + lambda+), where they are grid points."""
    marks = []
    defaults = (DEFAULTS["gpam_lambda_pos"], DEFAULTS["gpam_lambda_neg"])
    candidates = [defaults] + sorted(pt for pt in grid if pt[0] == pt[1])
    for p in sorted({p for p, _ in grid}):
        candidates.append((p, max(n for q, n in grid if q == p)))
    for pt in candidates:
        if pt in grid and pt not in marks:
            marks.append(pt)
    return marks


def parse_marks(text: str, grid: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    marks = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            p, n = (float(x) for x in item.split(":"))
        except ValueError:
            raise SystemExit(f"--mark: expected LAMBDA_POS:LAMBDA_NEG pairs separated by commas, got {item.strip()!r}") from None
        if (p, n) not in grid:
            raise SystemExit(f"--mark: ({p:g}, {n:g}) is not a point of the grid --lambda-pos x --lambda-neg")
        marks.append((p, n))
    return marks


# ----------------------------------------------------------------------------- trained lambdas

THETA_SUFFIXES = (".mechanism.lambda_pos_theta", ".mechanism.lambda_neg_theta")
TRAINED_FIELDS = ["checkpoint", "module", "head", "theta_pos", "theta_neg", "lambda_pos", "lambda_neg", "row_sum"]


def checkpoints_in(path: str) -> List[str]:
    """The checkpoint files that ``path`` names: a file; a folder holding checkpoint_best.pt (else
    checkpoint_last.pt), as fairseq's --save-dir does; a recipe run folder (its .train.done
    records the training command and so its --save-dir); or a folder with such folders below
    it, like the PTB controlled run (ckpt/<type>/checkpoint_best.pt). Raises CheckpointError."""
    from gpam_fairseq.checkpointing.checkpoints import CheckpointError

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder (--trained-lambda takes checkpoints or run folders)", path)

    def own(folder):
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        return None

    if own(path):
        return [own(path)]
    marker = os.path.join(path, ".train.done")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            command = json.load(f).get("command") or []
        if "--save-dir" in command[:-1]:
            save_dir = command[command.index("--save-dir") + 1]
            if own(save_dir):
                return [own(save_dir)]
            raise CheckpointError(f"{path}: the run's --save-dir {save_dir} holds no checkpoint_best.pt or "
                                  "checkpoint_last.pt", path)
    found = []
    for folder, subfolders, _ in os.walk(path):
        subfolders.sort()
        if own(folder):
            found.append(own(folder))
    if not found:
        raise CheckpointError(f"{path}: no checkpoint_best.pt or checkpoint_last.pt in it or below it, and no "
                              ".train.done naming a --save-dir", path)
    return found


def lambdas_from_thetas(theta_pos: torch.Tensor, theta_neg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lambda+, lambda-) per value of the thetas, converted by daGPAM's own module
    (DaGPAMMechanism.lambdas: softplus in the thetas' accumulation dtype), not by a copy of it."""
    from torch import nn

    from gpam_fairseq.attention.mechanisms import DaGPAMMechanism

    n = theta_pos.numel()
    if theta_neg.numel() != n:
        raise ValueError(f"lambda thetas of different sizes: {n} and {theta_neg.numel()}")
    options = GPAMOptions(trainable_lambda=True, lambda_scope="head" if n > 1 else "module")
    mechanism = DaGPAMMechanism(num_heads=n, head_dim=1, options=options)
    mechanism.lambda_pos_theta = nn.Parameter(theta_pos.detach().clone().reshape(n), requires_grad=False)
    mechanism.lambda_neg_theta = nn.Parameter(theta_neg.detach().clone().reshape(n), requires_grad=False)
    with torch.no_grad():
        pos, neg = mechanism.lambdas()
    return pos.flatten(), neg.flatten()


def read_trained_lambdas(checkpoint: str) -> List[dict]:
    """One row per attention module (per head with --gpam-lambda-scope head) whose lambdas the
    checkpoint holds as trainable thetas: the thetas and lambda = softplus(theta). [] if none."""
    from gpam_fairseq.checkpointing.checkpoints import load_state

    model = load_state(checkpoint)["model"]
    rows = []
    for key in sorted(model):
        if not key.endswith(THETA_SUFFIXES[0]):
            continue
        module = key[: -len(THETA_SUFFIXES[0])]
        neg_key = module + THETA_SUFFIXES[1]
        if neg_key not in model:
            raise ValueError(f"{checkpoint}: {key} has no {neg_key}")
        theta_pos, theta_neg = model[key].flatten(), model[neg_key].flatten()
        lam_pos, lam_neg = lambdas_from_thetas(theta_pos, theta_neg)
        per_head = theta_pos.numel() > 1
        for h in range(theta_pos.numel()):
            rows.append(dict(checkpoint=checkpoint, module=module, head=h if per_head else "all",
                             theta_pos=theta_pos[h].item(), theta_neg=theta_neg[h].item(),
                             lambda_pos=lam_pos[h].item(), lambda_neg=lam_neg[h].item(),
                             row_sum=1 + lam_pos[h].item() - lam_neg[h].item()))
    return rows


def trained_lambdas(paths: Sequence[str]) -> List[dict]:
    """The trained lambdas of every checkpoint ``paths`` name (see :func:`checkpoints_in`); the
    checkpoints without trainable lambdas (other types, fixed lambdas) are skipped with a note."""
    from gpam_fairseq.checkpointing.checkpoints import CheckpointError

    rows = []
    for path in paths:
        found = []
        for ckpt in checkpoints_in(path):
            got = read_trained_lambdas(ckpt)
            print(f"| trained lambda: {ckpt}: " + (f"{len(got)} value(s)" if got else
                  "no trainable lambdas (another attention type, or fixed lambdas): skipped"), flush=True)
            found += got
        if not found:
            raise CheckpointError(f"{path}: no checkpoint there holds trainable daGPAM lambdas "
                                  "(lambda_pos_theta / lambda_neg_theta; trained with --gpam-trainable-lambda)", path)
        rows += found
    return rows


def summarise_trained(rows: List[dict]) -> List[str]:
    lines = []
    for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = [r for r in rows if r["checkpoint"] == ckpt]
        pos, neg = [r["lambda_pos"] for r in mine], [r["lambda_neg"] for r in mine]
        lines.append(f"| {ckpt}: {len(mine)} value(s) over {len({r['module'] for r in mine})} module(s): "
                     f"lambda+ {min(pos):.4f}..{max(pos):.4f} (mean {sum(pos) / len(pos):.4f}), "
                     f"lambda- {min(neg):.4f}..{max(neg):.4f} (mean {sum(neg) / len(neg):.4f})")
    return lines


# ----------------------------------------------------------------------------- output


def write_csv(rows: Iterable[dict], path: str, fields: Sequence[str] = FIELDS) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


PANELS = [("residual_ratio", "residual ratio ||res(X)|| / ||X||", True),
          ("mean_cosine", "mean pairwise cosine similarity", False),
          ("grad_norm_wq", "||dL / dW_Q||", True)]


def _number(v) -> Optional[float]:
    if v is None or v == "":
        return None
    return float(v)


def _draw_curves(axes, rows: List[dict], legend: bool = True) -> None:
    """The three panels of :data:`PANELS` on ``axes``: one line per (label, stack), mean over seeds."""
    groups: Dict[tuple, Dict[int, List[float]]] = {}
    for r in rows:
        for key, _, _ in PANELS:
            v = _number(r.get(key))
            if v is None or v != v:
                continue
            groups.setdefault((r["label"], r["stack"], key), {}).setdefault(int(r["layer"]), []).append(v)
    labels = list(dict.fromkeys((r["label"], r["stack"]) for r in rows))
    labels.sort(key=lambda x: x[1])
    stacks = {s for _, s in labels}
    for ax, (key, ylabel, log) in zip(axes, PANELS):
        for label, stack in labels:
            data = groups.get((label, stack, key))
            if not data:
                continue
            xs = sorted(data)
            ys = [sum(data[x]) / len(data[x]) for x in xs]
            if log:
                ys = [max(y, 1e-300) for y in ys]
            name = label if len(stacks) == 1 else f"{label} ({stack})"
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layer (0 = input)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if legend:
        axes[0].legend(fontsize=7)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot(rows: List[dict], path: str, title: str = "", facet: Optional[str] = None) -> None:
    """Three panels (residual ratio, cosine, ||dL/dW_Q|| against the layer), one line per label;
    ``facet``: a column of the rows (e.g. neg_query_init) that gets one row of panels per value
    (the rows without a value, the reference types, are drawn in every one)."""
    plt = _pyplot()
    values = [None] if facet is None else sorted({r.get(facet) for r in rows if r.get(facet)}) or [None]
    fig, axes = plt.subplots(len(values), 3, figsize=(15, 4.2 * len(values)), squeeze=False)
    for row_axes, value in zip(axes, values):
        mine = rows if value is None else [r for r in rows if r.get(facet) in (value, None, "")]
        _draw_curves(row_axes, mine)
        if value is not None:
            row_axes[0].set_title(f"{facet} = {value}", fontsize=9, loc="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- the map

MAP_FIELDS = ["neg_query_init", "stack", "lambda_pos", "lambda_neg", "row_sum", "layer", "seeds",
              "residual_ratio_gmean", "residual_ratio_min", "residual_ratio_max", "grad_norm_wq_gmean", "state_rms_gmean"]
COLLAPSED = 1e-12  # a residual ratio below this is rank one up to float64 rounding (its floor is ~2e-16)


def _gmean(values: List[float]) -> float:
    """Geometric mean; NaN when one value is NaN (an overflowed stack), 0 when one is 0."""
    if any(v != v for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarise_grid(rows: List[dict]) -> List[dict]:
    """One row per (W_Q- init, stack, lambda+, lambda-, layer) of the grid's daGPAM rows, over
    seeds: geometric means (ratios and norms span many decades), and the residual's range."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r.get("attention_type") != "dagpam" or r.get("lambda_pos") in (None, ""):
            continue
        key = (r["neg_query_init"], r["stack"], float(r["lambda_pos"]), float(r["lambda_neg"]), int(r["layer"]))
        groups.setdefault(key, []).append(r)
    out = []
    for (init, stack, p, n, layer), mine in sorted(groups.items()):
        ratios = [float(r["residual_ratio"]) for r in mine]
        grads = [_number(r["grad_norm_wq"]) for r in mine]
        rms = [_number(r.get("state_rms")) for r in mine]
        out.append(dict(neg_query_init=init, stack=stack, lambda_pos=p, lambda_neg=n, row_sum=1 + p - n, layer=layer,
                        seeds=len(mine), residual_ratio_gmean=_gmean(ratios), residual_ratio_min=min(ratios),
                        residual_ratio_max=max(ratios),
                        grad_norm_wq_gmean=None if None in grads else _gmean(grads),
                        state_rms_gmean=None if None in rms else _gmean(rms)))
    return out


def reference_summary(rows: List[dict]) -> Dict[tuple, Dict[int, float]]:
    """{(type, stack): {layer: geometric mean residual ratio}} of the rows outside the grid."""
    groups: Dict[tuple, Dict[int, List[float]]] = {}
    for r in rows:
        if r.get("lambda_pos") not in (None, ""):
            continue
        groups.setdefault((r["label"], r["stack"]), {}).setdefault(int(r["layer"]), []).append(float(r["residual_ratio"]))
    return {k: {l: _gmean(v) for l, v in d.items()} for k, d in groups.items()}


def first_collapsed_layer(summary: List[dict], init: str, stack: str, p: float, n: float) -> Optional[int]:
    """The first layer whose (geometric mean) residual ratio is below :data:`COLLAPSED`; None if none."""
    for r in sorted((r for r in summary if (r["neg_query_init"], r["stack"], r["lambda_pos"], r["lambda_neg"]) ==
                     (init, stack, p, n)), key=lambda r: r["layer"]):
        if r["layer"] > 0 and r["residual_ratio_gmean"] < COLLAPSED:
            return r["layer"]
    return None


DEFAULT_MAP_LAYERS = ("2", "4", "last")


def resolve_layers(spec: Sequence[str], last: int) -> List[int]:
    """The layers of --map-layers ('last' = ``last``); the default's layers beyond ``last`` are left out."""
    layers = []
    for item in spec:
        try:
            layer = last if item == "last" else int(item)
        except ValueError:
            raise SystemExit(f"--map-layers: expected layer numbers or 'last', got {item!r}") from None
        if not 1 <= layer <= last:
            if tuple(spec) == DEFAULT_MAP_LAYERS:
                continue
            raise SystemExit(f"--map-layers: layer {item} is outside 1..{last}")
        if layer not in layers:
            layers.append(layer)
    return layers


def map_tables(summary: List[dict], layers_spec: Sequence[str], references: Dict[tuple, Dict[int, float]]) -> List[str]:
    """The map as text tables (rows lambda+, columns lambda-), for the console and the raw output."""
    lines = []
    for init, stack in dict.fromkeys((r["neg_query_init"], r["stack"]) for r in summary):
        mine = [r for r in summary if (r["neg_query_init"], r["stack"]) == (init, stack)]
        pos = sorted({r["lambda_pos"] for r in mine})
        neg = sorted({r["lambda_neg"] for r in mine})
        last = max(r["layer"] for r in mine)
        at = {(r["lambda_pos"], r["lambda_neg"], r["layer"]): r for r in mine}
        refs = {label: d for (label, st), d in references.items() if st == stack}

        def table(title, value):
            lines.append(f"| {title} (W_Q- init {init}, stack {stack}; rows lambda+, columns lambda-; '-' = invalid)")
            lines.append("| lambda+ \\ lambda- | " + " | ".join(f"{n:g}" for n in neg) + " |")
            for p in pos:
                cells = [value(p, n) if (p, n, 1) in at else "-" for n in neg]
                lines.append(f"| {p:g} | " + " | ".join(cells) + " |")

        for layer in resolve_layers(layers_spec, last):
            ref = ", ".join(f"{label} {d[layer]:.1e}" for label, d in refs.items() if layer in d)
            table(f"residual ratio at layer {layer}, geometric mean over seeds" + (f" (reference: {ref})" if ref else ""),
                  lambda p, n, layer=layer: f"{at[(p, n, layer)]['residual_ratio_gmean']:.1e}")
        table(f"first layer with residual ratio < {COLLAPSED:g} ('none' = not within {last})",
              lambda p, n: str(first_collapsed_layer(summary, init, stack, p, n) or "none"))
        table("||dL/dW_Q|| of layer 1, geometric mean over seeds",
              lambda p, n: f"{at[(p, n, 1)]['grad_norm_wq_gmean']:.1e}")
        table(f"RMS of the states at layer {last}, geometric mean over seeds",
              lambda p, n: f"{at[(p, n, last)]['state_rms_gmean']:.1e}")
    return lines


def _grid_position(values: List[float], v: float) -> float:
    """Where the value v lies on an axis whose ticks 0, 1, ... are the sorted grid values
    (piecewise linear between them, beyond the ends by the last step)."""
    import numpy as np

    if len(values) == 1:
        return 0.0 + (v - values[0])
    if v <= values[0]:
        return (v - values[0]) / (values[1] - values[0])
    if v >= values[-1]:
        return len(values) - 1 + (v - values[-1]) / (values[-1] - values[-2])
    return float(np.interp(v, values, range(len(values))))


def plot_map(summary: List[dict], path: str, layers_spec: Sequence[str], trained: Sequence[dict] = (),
             title: str = "") -> None:
    """Heat maps over the grid (rows lambda+, columns lambda-), one row of panels per (W_Q-
    init, stack): log10 of the residual ratio at each layer of ``layers_spec``, then log10 of
    layer 1's ||dL/dW_Q||. Invalid points (lambda- >= 1 + lambda+) are grey; the line is the
    limit lambda- = 1 + lambda+; trained lambdas are the white dots (one per module or head)."""
    import numpy as np

    plt = _pyplot()
    facets = list(dict.fromkeys((r["neg_query_init"], r["stack"]) for r in summary))
    last_of = {f: max(r["layer"] for r in summary if (r["neg_query_init"], r["stack"]) == f) for f in facets}
    ncols = max(len(resolve_layers(layers_spec, last)) for last in last_of.values()) + 2
    columns = max(len({r["lambda_neg"] for r in summary}), 1)
    width = max(4.3, 0.3 * columns + 1.6)
    fig, axes = plt.subplots(len(facets), ncols, figsize=(width * ncols, 3.9 * len(facets)), squeeze=False)
    for row_axes, facet in zip(axes, facets):
        mine = [r for r in summary if (r["neg_query_init"], r["stack"]) == facet]
        pos = sorted({r["lambda_pos"] for r in mine})
        neg = sorted({r["lambda_neg"] for r in mine})
        at = {(r["lambda_pos"], r["lambda_neg"], r["layer"]): r for r in mine}
        panels = [(f"residual ratio, layer {l}", "residual_ratio_gmean", l, (-16, 0))
                  for l in resolve_layers(layers_spec, last_of[facet])]
        panels.append((f"first layer with residual ratio < {COLLAPSED:g}", "first_collapsed", 1, None))
        panels.append(("||dL/dW_Q||, layer 1", "grad_norm_wq_gmean", 1, None))
        last = last_of[facet]
        for ax in row_axes[len(panels):]:
            ax.axis("off")
        for ax, (name, key, layer, limits) in zip(row_axes, panels):
            collapse_panel = key == "first_collapsed"
            grid = np.full((len(pos), len(neg)), np.nan)
            texts = {}
            for i, p in enumerate(pos):
                for j, n in enumerate(neg):
                    r = at.get((p, n, layer))
                    if r is None:
                        continue
                    if collapse_panel:
                        first = first_collapsed_layer(summary, facet[0], facet[1], p, n)
                        grid[i, j] = last + 1 if first is None else first
                        texts[i, j] = "none" if first is None else str(first)
                    elif r[key] is not None:
                        v = r[key]
                        texts[i, j] = "overflow" if v != v else f"{v:.1e}"
                        if v == v:
                            grid[i, j] = math.log10(max(v, 1e-300))
            cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
            if limits and np.isfinite(grid).any():  # ratios: down to the floor in pure stacks, near 1 with residuals
                limits = (max(min(math.floor(np.nanmin(grid)), -1), limits[0]), limits[1])
            vmin, vmax = limits or ((1, last + 1) if collapse_panel else (np.nanmin(grid), np.nanmax(grid)))
            image = ax.imshow(grid, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            fig.colorbar(image, ax=ax, label="layer" if collapse_panel else "log10", fraction=0.046)
            rotation = 90 if len(neg) > 6 else 0  # many columns: narrow cells
            for i, p in enumerate(pos):
                for j, n in enumerate(neg):
                    if breaks_row_sum(p, n):
                        ax.text(j, i, "invalid", ha="center", va="center", fontsize=6, color="#707070", rotation=rotation)
                    elif (i, j) in texts:
                        shade = (grid[i, j] - vmin) / ((vmax - vmin) or 1) if grid[i, j] == grid[i, j] else 1
                        ax.text(j, i, texts[i, j], ha="center", va="center", fontsize=6, rotation=rotation,
                                color="white" if shade < 0.5 else "black")
            # the limit lambda- = 1 + lambda+, drawn through the grid's coordinates
            ps = np.linspace(pos[0], pos[-1], 200) if len(pos) > 1 else np.array(pos)
            ax.plot([_grid_position(neg, 1 + p) for p in ps], [_grid_position(pos, p) for p in ps],
                    color="red", linewidth=1, label="lambda- = 1 + lambda+")
            for ckpt, marker in zip(dict.fromkeys(r["checkpoint"] for r in trained), "os^Dv<>p"):
                mine = [r for r in trained if r["checkpoint"] == ckpt]
                run_name = os.path.join(*os.path.normpath(ckpt).split(os.sep)[-4:-1])  # the run, not the file
                ax.scatter([_grid_position(neg, r["lambda_neg"]) for r in mine],
                           [_grid_position(pos, r["lambda_pos"]) for r in mine], marker=marker,
                           s=14, c="white", edgecolors="black", linewidths=0.6, zorder=5, label=f"trained lambda: {run_name}")
            ax.set_xlim(-0.5, len(neg) - 0.5)
            ax.set_ylim(-0.5, len(pos) - 0.5)
            ax.set_xticks(range(len(neg)))
            ax.set_xticklabels([f"{n:g}" for n in neg], fontsize=7)
            ax.set_yticks(range(len(pos)))
            ax.set_yticklabels([f"{p:g}" for p in pos], fontsize=7)
            ax.set_xlabel("lambda-")
            ax.set_ylabel("lambda+")
            ax.set_title(f"{name}\nW_Q- {facet[0]}, {facet[1]}", fontsize=8)
        row_axes[0].legend(fontsize=6, loc="lower right")  # over the invalid corner
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_names(text: str, flag: str, allowed, kind: str, unique: bool = False) -> List[str]:
    """A comma list of names, each one of `allowed` (one line naming `flag` otherwise)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if unique:
        names = list(dict.fromkeys(names))
    for name in names:
        if name not in allowed:
            raise SystemExit(f"{flag}: unknown {kind} {name!r}; choose from {', '.join(allowed)}")
    if not names:
        raise SystemExit(f"{flag}: empty list")
    return names


def parse_types(text: str) -> List[str]:
    return parse_names(text, "--attention-types", ATTENTION_TYPES, "type")


def parse_seeds(text: str) -> List[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected a comma list of integers, got {text!r}") from None


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to measure (one of)")
    src.add_argument("--checkpoint", nargs="+", help="trained checkpoint(s); each is labelled by its --attention-type")
    src.add_argument("--arch", help="a fairseq architecture, built at random initialisation (with --random-init)")
    src.add_argument("--random-init", action="store_true", help="measure --arch at its random initialisation")
    src.add_argument("--pure-attention", action="store_true", help="stacks of attention only (no residual, no FFN)")
    p.add_argument("--attention-types", default="softmax,dagpam",
                   help="comma list, for --random-init and --pure-attention (default: softmax,dagpam)")
    p.add_argument("--task", default="language_modeling", choices=["language_modeling", "translation"],
                   help="fairseq task of --arch (default language_modeling)")
    p.add_argument("--fairseq-args", default="", help="extra fairseq-train flags for --arch, as one string")
    p.add_argument("--vocab", type=int, default=1000, help="dictionary size for --arch without --data-bin")
    data = p.add_argument_group("input")
    data.add_argument("--data-bin", help="fairseq-preprocess output; without it (or with --random-tokens) random tokens")
    data.add_argument("--split", default="valid", help="data split (default valid)")
    data.add_argument("--random-tokens", action="store_true", help="random tokens even when --data-bin is given")
    data.add_argument("--batch-size", type=int, default=8, help="sentences in the measured batch (default 8)")
    data.add_argument("--tokens", type=int, default=32, help="length of random sequences (default 32)")
    pure = p.add_argument_group("pure attention stacks")
    pure.add_argument("--depth", type=int, default=12)
    pure.add_argument("--dim", type=int, default=64)
    pure.add_argument("--heads", type=int, default=4)
    grid = p.add_argument_group(
        "the lambda map (daGPAM, with --pure-attention or --arch ... --random-init)",
        "daGPAM is measured at every point of the product grid --lambda-pos x --lambda-neg; the other "
        "--attention-types once, as references. Points with lambda- >= 1 + lambda+ are refused unless "
        "--skip-invalid. Writes PREFIX.csv (every row, with lambda_pos and lambda_neg), PREFIX.png "
        "(per-layer curves of the --mark points), PREFIX_map.csv (geometric means over seeds) and "
        "PREFIX_map.png (heat maps over the grid).")
    grid.add_argument("--lambda-pos", help="comma list of lambda+ values >= 0 (default: 0.2, the default of --gpam-lambda-pos)")
    grid.add_argument("--lambda-neg", help="comma list of lambda- values >= 0 (default: 0.2, the default of --gpam-lambda-neg)")
    grid.add_argument("--skip-invalid", action="store_true",
                      help="drop the grid points with lambda- >= 1 + lambda+ instead of refusing the grid")
    grid.add_argument("--neg-query-inits",
                      help=f"comma list of W_Q- initialisations for daGPAM, a facet of the map: {', '.join(NEG_QUERY_INITS)} "
                           "(default: the one daGPAM is configured with, neg_identity unless --fairseq-args sets "
                           "--gpam-neg-query-init)")
    grid.add_argument("--map-layers", default=",".join(DEFAULT_MAP_LAYERS),
                      help="layers whose residual ratio the heat maps show, 'last' = the last layer (default 2,4,last)")
    grid.add_argument("--mark", help="LAMBDA_POS:LAMBDA_NEG points whose per-layer curves PREFIX.png draws (default: "
                                     "0.2:0.2, the grid's points with lambda+ = lambda-, and per lambda+ its largest lambda-)")
    grid.add_argument("--from-csv", metavar="CSV",
                      help="measure nothing: draw PREFIX.png and the map (PREFIX_map.csv/png) again from the PREFIX.csv "
                           "of an earlier grid run (other --map-layers, --mark or --trained-lambda)")
    grid.add_argument("--trained-lambda", nargs="+", metavar="PATH",
                      help="checkpoints or run folders (a --save-dir, a recipe run folder, the PTB controlled run's "
                           "--out-dir) whose trainable lambdas are marked on the heat maps and written to "
                           "PREFIX_trained_lambda.csv; alone, only that CSV is written")
    p.add_argument("--seeds", default="1", help="comma list of seeds (default 1)")
    p.add_argument("--norm", default="fro", choices=["fro", "l1inf"], help="residual norm (default fro)")
    p.add_argument("--out-prefix", default="collapse", help="writes PREFIX.csv and PREFIX.png")
    return p


def grid_of(args) -> Optional[List[Tuple[float, float]]]:
    """The (lambda+, lambda-) grid asked for, validated; None when neither list is given."""
    if getattr(args, "lambda_pos", None) is None and getattr(args, "lambda_neg", None) is None:
        return None
    pos = parse_floats(args.lambda_pos, "--lambda-pos") if args.lambda_pos is not None else [DEFAULTS["gpam_lambda_pos"]]
    neg = parse_floats(args.lambda_neg, "--lambda-neg") if args.lambda_neg is not None else [DEFAULTS["gpam_lambda_neg"]]
    return lambda_grid(pos, neg, args.skip_invalid)


def parse_inits(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return parse_names(text, "--neg-query-inits", NEG_QUERY_INITS, "initialisation", unique=True)


def fixed_lambdas(modules) -> dict:
    """lambda_pos/lambda_neg/neg_query_init columns for a model whose daGPAM modules all share
    fixed lambdas and one W_Q- initialisation (else empty)."""
    from gpam_fairseq.attention.mechanisms import DaGPAMMechanism

    found = {(m.lambda_pos_fixed, m.lambda_neg_fixed, m.neg_query_init)
             for module in modules for m in module.modules()
             if isinstance(m, DaGPAMMechanism) and not m.trainable_lambda}
    if len(found) != 1:
        return {}
    p, n, init = found.pop()
    return dict(lambda_pos=p, lambda_neg=n, neg_query_init=init)


def run(args) -> List[dict]:
    modes = sum(bool(x) for x in (args.checkpoint, args.random_init, args.pure_attention))
    if modes != 1:
        raise SystemExit("give exactly one of --checkpoint, --arch ... --random-init, --pure-attention")
    if args.random_init and not args.arch:
        raise SystemExit("--random-init: needs --arch NAME")
    grid = grid_of(args)  # refused points stop here, before anything is built
    inits = parse_inits(getattr(args, "neg_query_inits", None))
    seeds = parse_seeds(args.seeds)
    rows: List[dict] = []
    use_data = args.data_bin and not args.random_tokens
    if grid is not None and args.checkpoint:
        raise SystemExit("--lambda-pos/--lambda-neg: a grid is measured with --pure-attention or --arch ... --random-init, "
                         "not on trained --checkpoint files (their lambdas are what training made them)")

    if args.pure_attention:
        settings = settings_for(parse_types(args.attention_types), grid, inits)
        if grid is not None and not any(s.lambda_pos is not None for s in settings):
            raise SystemExit("--lambda-pos/--lambda-neg: the grid is for daGPAM; add dagpam to --attention-types")
        for setting in settings:
            for seed in seeds:
                print(f"| pure attention: {setting.label}, seed {seed}, depth {args.depth}", flush=True)
                layers_options = setting.options() if setting.attention_type == "dagpam" else None
                columns = {} if layers_options is None else dict(
                    lambda_pos=layers_options.lambda_pos, lambda_neg=layers_options.lambda_neg,
                    neg_query_init=layers_options.neg_query_init)
                for r in measure_pure(setting.attention_type, args.depth, args.dim, args.heads, args.tokens,
                                      args.batch_size, seed, args.norm, layers_options):
                    rows.append(dict(label=setting.label, attention_type=setting.attention_type, seed=seed,
                                     **columns, **r))
        return rows

    jobs = []
    if args.checkpoint:
        for path in args.checkpoint:
            jobs.append(("checkpoint", path, None))
    else:
        settings = settings_for(parse_types(args.attention_types), grid, inits)
        if grid is not None and not any(s.lambda_pos is not None for s in settings):
            raise SystemExit("--lambda-pos/--lambda-neg: the grid is for daGPAM; add dagpam to --attention-types")
        jobs = [("random", s.attention_type, s) for s in settings]
    for kind, what, setting in jobs:
        for seed in seeds:
            if kind == "checkpoint":
                model, task, attention_type = load_checkpoint(what, args.data_bin)
                label = attention_type
            else:
                extra = shlex.split(args.fairseq_args) + (setting.fairseq_flags() if what == "dagpam" else [])
                model, task = build_random_model(args.arch, args.task, what, extra, args.data_bin, args.vocab, seed)
                attention_type, label = what, setting.label
            print(f"| {label}: {what if kind == 'checkpoint' else args.arch}, seed {seed}", flush=True)
            sample = data_sample(task, args.split, args.batch_size) if use_data else \
                random_sample(task, args.batch_size, args.tokens, seed, language_model=not hasattr(model, "encoder"))
            # what the model's daGPAM modules hold (a grid point's flags, or --fairseq-args, or the defaults)
            columns = fixed_lambdas([model]) or (setting.columns() if setting else {})
            torch.manual_seed(seed)
            for r in measure_model(model.float(), sample, task.target_dictionary.pad(), args.norm):
                rows.append(dict(label=label, attention_type=attention_type, seed=seed, **columns, **r))
    return rows


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    measures = bool(args.checkpoint or args.random_init or args.pure_attention)
    if args.from_csv:
        if measures or args.lambda_pos is not None or args.lambda_neg is not None:
            raise SystemExit("--from-csv: draws an earlier grid run again; give no --checkpoint, --arch, "
                             "--pure-attention, --lambda-pos or --lambda-neg with it")
        with open(args.from_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        grid = sorted({(float(r["lambda_pos"]), float(r["lambda_neg"])) for r in rows
                       if r.get("attention_type") == "dagpam" and r.get("lambda_pos")})
        if not grid:
            raise SystemExit(f"--from-csv: {args.from_csv} has no daGPAM rows with lambda_pos/lambda_neg (not a grid run)")
    else:
        grid = grid_of(args)  # refused points stop here, before the checkpoints are read
    marks = parse_marks(args.mark, grid) if (args.mark and grid) else (default_marks(grid) if grid else None)
    trained = trained_lambdas(args.trained_lambda) if args.trained_lambda else []
    if trained:
        write_csv(trained, args.out_prefix + "_trained_lambda.csv", TRAINED_FIELDS)
        print("\n".join(summarise_trained(trained)))
        print(f"| wrote {args.out_prefix}_trained_lambda.csv ({len(trained)} rows)")
        if not measures and not args.from_csv:
            return
    if args.from_csv:
        title = f"{args.from_csv}, seeds {','.join(sorted({r['seed'] for r in rows}, key=int))}"
    else:
        rows = run(args)
        write_csv(rows, args.out_prefix + ".csv")
        what = "pure attention stacks" if args.pure_attention else ("trained checkpoints" if args.checkpoint else f"{args.arch} at init")
        title = f"{what}, {args.norm} residual, seeds {args.seeds}"
    if grid is None:
        plot(rows, args.out_prefix + ".png", title=title)
        print(f"| wrote {args.out_prefix}.csv ({len(rows)} rows) and {args.out_prefix}.png")
        return
    shown = [r for r in rows if r.get("lambda_pos") in (None, "") or (float(r["lambda_pos"]), float(r["lambda_neg"])) in marks]
    plot(shown, args.out_prefix + ".png", title=f"{title}: marked lambda points", facet="neg_query_init")
    summary = summarise_grid(rows)
    write_csv(summary, args.out_prefix + "_map.csv", MAP_FIELDS)
    layers_spec = [x.strip() for x in args.map_layers.split(",") if x.strip()]
    print("\n".join(map_tables(summary, layers_spec, reference_summary(rows))))
    plot_map(summary, args.out_prefix + "_map.png", layers_spec, trained, title=title)
    written = "" if args.from_csv else f"{args.out_prefix}.csv ({len(rows)} rows), "
    print(f"| wrote {written}{args.out_prefix}.png, {args.out_prefix}_map.csv ({len(summary)} rows) and "
          f"{args.out_prefix}_map.png")
