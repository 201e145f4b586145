"""Rank collapse and gradient diagnostics per layer, for one or several attention types.

The command line of ``scripts/analyze_collapse.py``. For every layer l of a model (or of a pure
attention stack) it measures, on one batch, the rank-collapse residual ratio of the layer's
output (Dong et al. 2021; Frobenius norm, or ``--norm l1inf``: :mod:`.metrics`), the mean
pairwise cosine similarity of the token representations and the gradient norm ||dL/dW_Q|| of
that layer's query weights (:mod:`.measure`).

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

The PTB controlled experiment (``examples/ptb/controlled/run_controlled.py``) calls :func:`run`
on its trained checkpoints, and :func:`.output.write_csv` and :func:`.output.plot`.

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
import shlex
from typing import List, Optional, Tuple

import torch

from gpam_fairseq.measurement.collapse.grid import default_marks, lambda_grid, parse_floats, parse_marks, settings_for
from gpam_fairseq.measurement.collapse.lambda_map import (DEFAULT_MAP_LAYERS, MAP_FIELDS, map_tables, plot_map,
                                                           reference_summary, summarise_grid)
from gpam_fairseq.measurement.collapse.measure import (build_random_model, data_sample, load_checkpoint, measure_model,
                                                        measure_pure, random_sample)
from gpam_fairseq.measurement.collapse.output import plot, write_csv
from gpam_fairseq.measurement.collapse.trained import TRAINED_FIELDS, summarise_trained, trained_lambdas
from gpam_fairseq.options import ATTENTION_TYPES, DEFAULTS, NEG_QUERY_INITS
from gpam_fairseq.fairseq_glue.cli_errors import refusals_exit_2


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


@refusals_exit_2
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
