"""A model or a stack of attention only, measured layer by layer in one forward/backward pass.

Every row is one (stack, layer): the metrics of :mod:`.metrics` on the layer's output and the
gradient norm ||dL/dW_Q|| of the loss with respect to that layer's query weights
(``self_attn.q_proj.weight``). Models: their own cross-entropy on the batch. Pure stacks:
L = 1/2 mean((X_L - Z)^2) with a fixed random target Z. Layer 0 is the input of the first
layer (embeddings); it has no gradient norm.
"""

from typing import Dict, List, Optional, Sequence

import torch

import gpam_fairseq  # noqa: F401  (registers the models)
from gpam_fairseq.fairseq_glue.tools import make_dictionary, parse_training_args, task_without_data
from gpam_fairseq.measurement.collapse.metrics import batch_metrics
from gpam_fairseq.options import GPAMOptions

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
