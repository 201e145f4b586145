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
import logging
import os
import shlex
from typing import Dict, Iterable, List, Optional, Sequence

import torch

import gpam_fairseq  # noqa: F401  (registers the models)
from gpam_fairseq.fairseq_tools import make_dictionary, parse_training_args, task_without_data
from gpam_fairseq.options import ATTENTION_TYPES, GPAMOptions

FIELDS = ["label", "attention_type", "seed", "stack", "layer", "norm", "residual_ratio", "mean_cosine", "grad_norm_wq"]


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
    """(mean residual ratio, mean cosine) over the sentences of states (T, B, d); sentence b
    occupies the positions spans[b] = (start, end) (fairseq left-pads sources, right-pads targets)."""
    ratios, cosines = [], []
    for b, (start, end) in enumerate(spans):
        x = states[start:end, b]
        ratios.append(residual_ratio(x, norm))
        cosines.append(mean_cosine(x))
    n = len(ratios)
    return sum(ratios) / n, sum(cosines) / n


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
            ratio, cos = batch_metrics(states, spans, norm)
            grad = None
            if i > 0:
                g = layers[i - 1].self_attn.q_proj.weight.grad
                grad = g.norm().item() if g is not None else float("nan")
            rows.append(dict(stack=stack, layer=i, norm=norm, residual_ratio=ratio, mean_cosine=cos, grad_norm_wq=grad))
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
    from gpam_fairseq.checkpoints import load_models

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


def pure_stack(attention_type: str, depth: int, dim: int, heads: int, seed: int, dtype=torch.float64):
    """``depth`` self-attention modules, no residual, no FFN, no norm. The projections
    (W_Q, W_K, W_V, W_O) are those of a softmax stack with the same seed, so mechanisms
    differ only in what is specific to them."""
    from gpam_fairseq.modules.transformer import build_attention

    torch.manual_seed(seed)
    reference = [build_attention("enc_self", GPAMOptions(attention_type="softmax"), dim, heads, self_attention=True)
                 for _ in range(depth)]
    layers = []
    for l, ref in enumerate(reference, start=1):
        torch.manual_seed(seed * 1000 + l)
        layer = build_attention("enc_self", GPAMOptions(attention_type=attention_type), dim, heads, layer_index=l,
                                self_attention=True)
        missing, unexpected = layer.load_state_dict(ref.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("mechanism.") for k in missing)
        layers.append(layer.to(dtype).eval())
    return layers


def measure_pure(attention_type: str, depth: int, dim: int, heads: int, tokens: int, batch: int, seed: int,
                 norm: str = "fro") -> List[dict]:
    dtype = torch.float64  # ratios fall to ~1e-16 within a few layers: fp32 would floor at ~1e-7
    layers = pure_stack(attention_type, depth, dim, heads, seed, dtype)
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
        ratio, cos = batch_metrics(s, spans, norm)
        grad = layers[i - 1].q_proj.weight.grad.norm().item() if i > 0 else None
        rows.append(dict(stack="pure", layer=i, norm=norm, residual_ratio=ratio, mean_cosine=cos, grad_norm_wq=grad))
    return rows


# ----------------------------------------------------------------------------- output


def write_csv(rows: Iterable[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def plot(rows: List[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("residual_ratio", "residual ratio ||res(X)|| / ||X||", True),
              ("mean_cosine", "mean pairwise cosine similarity", False),
              ("grad_norm_wq", "||dL / dW_Q||", True)]
    groups: Dict[tuple, Dict[int, List[float]]] = {}
    for r in rows:
        for key, _, _ in panels:
            v = r.get(key)
            if v is None or v == "" or v != v:
                continue
            groups.setdefault((r["label"], r["stack"], key), {}).setdefault(int(r["layer"]), []).append(float(v))
    labels = sorted({(r["label"], r["stack"]) for r in rows}, key=lambda x: (x[1], x[0]))
    stacks = {s for _, s in labels}
    for ax, (key, ylabel, log) in zip(axes, panels):
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
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def parse_types(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for t in names:
        if t not in ATTENTION_TYPES:
            raise SystemExit(f"--attention-types: unknown type {t!r}; choose from {', '.join(ATTENTION_TYPES)}")
    if not names:
        raise SystemExit("--attention-types: empty list")
    return names


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
    p.add_argument("--seeds", default="1", help="comma list of seeds (default 1)")
    p.add_argument("--norm", default="fro", choices=["fro", "l1inf"], help="residual norm (default fro)")
    p.add_argument("--out-prefix", default="collapse", help="writes PREFIX.csv and PREFIX.png")
    return p


def run(args) -> List[dict]:
    modes = sum(bool(x) for x in (args.checkpoint, args.random_init, args.pure_attention))
    if modes != 1:
        raise SystemExit("give exactly one of --checkpoint, --arch ... --random-init, --pure-attention")
    if args.random_init and not args.arch:
        raise SystemExit("--random-init: needs --arch NAME")
    seeds = parse_seeds(args.seeds)
    rows: List[dict] = []
    use_data = args.data_bin and not args.random_tokens

    if args.pure_attention:
        for t in parse_types(args.attention_types):
            for seed in seeds:
                print(f"| pure attention: {t}, seed {seed}, depth {args.depth}", flush=True)
                for r in measure_pure(t, args.depth, args.dim, args.heads, args.tokens, args.batch_size, seed, args.norm):
                    rows.append(dict(label=t, attention_type=t, seed=seed, **r))
        return rows

    jobs = []
    if args.checkpoint:
        for path in args.checkpoint:
            jobs.append(("checkpoint", path))
    else:
        jobs = [("random", t) for t in parse_types(args.attention_types)]
    for kind, what in jobs:
        for seed in seeds:
            if kind == "checkpoint":
                model, task, attention_type = load_checkpoint(what, args.data_bin)
                label = attention_type
            else:
                model, task = build_random_model(args.arch, args.task, what, shlex.split(args.fairseq_args), args.data_bin,
                                                 args.vocab, seed)
                attention_type = label = what
            print(f"| {label}: {what if kind == 'checkpoint' else args.arch}, seed {seed}", flush=True)
            sample = data_sample(task, args.split, args.batch_size) if use_data else \
                random_sample(task, args.batch_size, args.tokens, seed, language_model=not hasattr(model, "encoder"))
            torch.manual_seed(seed)
            for r in measure_model(model.float(), sample, task.target_dictionary.pad(), args.norm):
                rows.append(dict(label=label, attention_type=attention_type, seed=seed, **r))
    return rows


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    rows = run(args)
    write_csv(rows, args.out_prefix + ".csv")
    what = "pure attention stacks" if args.pure_attention else ("trained checkpoints" if args.checkpoint else f"{args.arch} at init")
    plot(rows, args.out_prefix + ".png", title=f"{what}, {args.norm} residual, seeds {args.seeds}")
    print(f"| wrote {args.out_prefix}.csv ({len(rows)} rows) and {args.out_prefix}.png")

