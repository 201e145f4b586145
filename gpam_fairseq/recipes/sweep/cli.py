"""The command line of λ sweeps (scripts/sweep.py, ``python -m gpam_fairseq.recipes.sweep``): the
grid's flags, then the grid run by one of the runners and its table and plot written."""

import argparse
import datetime
import os
import shlex
import sys

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT, say
from gpam_fairseq.recipes import controls
from gpam_fairseq.recipes.common import RecipeError, stop
from gpam_fairseq.recipes import registry
from gpam_fairseq.recipes.sweep.grid import QUICK_MAX_UPDATE, build_cells, cell_status
from gpam_fairseq.recipes.sweep.report import collect, plot, write_tables
from gpam_fairseq.recipes.sweep.runners import GridProgress, _worker, run_in_process, run_parallel, run_submitit


# ----------------------------------------------------------------------------- command line


def parser():
    p = argparse.ArgumentParser(
        prog="scripts/sweep.py", description="A grid of daGPAM settings x seeds for one recipe, with its baselines.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("recipe", choices=sorted(registry.NAMES))
    g = p.add_argument_group("grid")
    g.add_argument("--lambda-pos", nargs="+", default=["0.2"], metavar="λ+", help="values of λ+ (default: 0.2)")
    g.add_argument("--lambda-neg", nargs="+", default=["same"], metavar="λ−",
                   help="values of λ−, or 'same' for λ− = λ+ (rows sum to 1; the default)")
    g.add_argument("--lambda", dest="lambda_mode", nargs="+", default=["fixed"], metavar="fixed|trainable",
                   help="fixed λ, trainable λ (starting at the values above), or both (default: fixed)")
    g.add_argument("--neg-query-init", nargs="+", default=["neg_identity"], help="W_Q- init: neg_identity, random")
    g.add_argument("--neg-query", nargs="+", default=["shared"], help="W_Q- sharing: shared, per_head")
    g.add_argument("--blocks", nargs="+", default=["all"],
                   help="'all' or comma lists of enc_self, dec_self, cross (one grid value each)")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of every setting (default: 1 2 3)")
    g.add_argument("--controls", nargs="*", default=[], metavar="CONTROL",
                   help="also baseline_params and/or baseline_maps, with the same seeds")
    g.add_argument("--no-baseline", action="store_true", help="leave the baseline runs out")
    g.add_argument("--x", choices=("lambda_pos", "lambda_neg"), default="lambda_pos", help="the plot's x axis")
    r = p.add_argument_group("runs")
    r.add_argument("--out", help="the sweep's folder: run folders, checkpoints, results (default: sweeps/<recipe>[_quick])")
    r.add_argument("--checkpoints", metavar="DIR",
                   help="where the cells' checkpoints go (default: <out>/checkpoints); a disk apart from the run folders")
    r.add_argument("--quick", action="store_true",
                   help=f"tiny model and {QUICK_MAX_UPDATE} updates (CPU, minutes): checks the pipeline, not daGPAM")
    r.add_argument("--max-update", type=int, help="updates of every cell (default: the recipe's)")
    r.add_argument("--extra-args", default="", help="fairseq-train flags for every cell (after EXTRA_ARGS)")
    r.add_argument("--gpam-args", default="", help="daGPAM flags for every daGPAM cell (after GPAM_ARGS)")
    r.add_argument("--collect", action="store_true", help="run nothing: write the table and plot from the run folders")
    e = p.add_argument_group("where the cells run")
    e.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="N cells at once, one per visible GPU (on a CPU: N processes); default 1, in this process")
    e.add_argument("--slurm", action="store_true", help="submit the cells as a SLURM job array through submitit")
    e.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                   help="submitit's executor for --slurm (default: slurm; 'local' runs the same job array on this "
                        "machine, 'debug' in this process)")
    e.add_argument("--slurm-partition")
    e.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MINUTES", help="time limit per cell (default: 1440)")
    e.add_argument("--slurm-gpus-per-node", type=int, default=1, help="GPUs per cell (default: 1)")
    e.add_argument("--slurm-cpus-per-task", type=int, default=8, help="CPUs per cell (default: 8)")
    e.add_argument("--slurm-mem-gb", type=int, help="memory per cell in GB")
    e.add_argument("--slurm-array-parallelism", type=int, default=64, help="cells running at once (default: 64)")
    e.add_argument("--slurm-account")
    e.add_argument("--slurm-qos")
    e.add_argument("--slurm-constraint")
    e.add_argument("--no-wait", action="store_true", help="with --slurm: submit and return (then --collect)")
    return p


EPILOG = """Examples:
  python scripts/sweep.py iwslt14 --lambda-pos 0.1 0.2 0.5 1.0 --seeds 1 2 3 --controls baseline_params
  python scripts/sweep.py iwslt14 --lambda-pos 0.2 0.5 --lambda trainable fixed --parallel 4
  python scripts/sweep.py ptb --lambda-pos 0.2 --lambda-neg 0.1 0.2 0.4 --x lambda_neg --slurm --slurm-partition gpu
  python scripts/sweep.py iwslt14 --quick --lambda-pos 0.1 0.3 --seeds 1 2        # CPU smoke run

The recipe variables (SIZE, SETUP, DIRECTION, LN, DATA_DIR, EXTRA_ARGS, GPAM_ARGS, ...) come from the
environment as for the recipe's stages; the data must be prepared and preprocessed first. Rerunning
the same command skips finished cells and resumes interrupted ones. Outputs: <out>/results.md,
results.csv, results.png, <out>/runs/<run>/ (run folders, for scripts/compare_runs.py too)."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run-cell"]:  # a worker of --parallel
        return _worker(argv[1])
    args = parser().parse_args(argv)
    try:
        recipe = registry.get(args.recipe)
        name = recipe.name + (f"_{recipe.data_subdir}" if recipe.data_subdir else "")
        out = os.path.abspath(args.out or os.path.join(REPO_ROOT, "sweeps", name + ("_quick" if args.quick else "")))
        if args.parallel < 1:
            raise RecipeError(f"--parallel {args.parallel}: must be 1 or more")
        from gpam_fairseq.recipes.common import is_done
        from gpam_fairseq.recipes.stages import Settings

        with controls.environment(MODEL="baseline"):
            data_bin = Settings(recipe).data_bin
        if not args.collect and not is_done(data_bin, "preprocess"):
            raise RecipeError(f"{data_bin} is not binarised: run examples/{recipe.name}/prepare.py and preprocess.py "
                              f"first (same DATA_DIR/SETUP)")
        cells = build_cells(args, recipe, out)
        os.makedirs(out, exist_ok=True)
        command = "python scripts/sweep.py " + shlex.join(argv)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(os.path.join(out, "sweep.log"), "a", encoding="utf-8") as f:
            f.write(f"{stamp}  {command}\n")
        statuses = {c.run_name: cell_status(c.run_dir, c.save_dir, c.spec["max_update"]) for c in cells}
        todo = [c for c in cells if statuses[c.run_name] != "done"]
        counts = {k: sum(1 for v in statuses.values() if v == k) for k in ("done", "new", "resume", "extend", "evaluate")}
        say(f"[sweep] {recipe.name}: {len(cells)} cells ({len(cells) // len(args.seeds)} settings x {len(args.seeds)} "
            f"seeds) in {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        progress = GridProgress(cells, 1 if args.slurm else args.parallel)
        for c in cells:
            if statuses[c.run_name] == "done":
                say(f"[sweep] cell {progress.index[c.run_name]}/{len(cells)} {c.run_name}: skipped (done)")
                progress.finished += 1
        finished = True
        if todo and not args.collect:
            if args.slurm:
                progress.parallel = max(1, min(args.slurm_array_parallelism, len(todo)))
                finished = run_submitit(todo, progress, args, out)
            elif args.parallel > 1:
                run_parallel(todo, progress, args.parallel, out)
            else:
                run_in_process(todo, progress)
        rows, metric = collect(cells, recipe)
        with controls.environment(MODEL="baseline"):
            s = Settings(recipe)
        what = ", ".join(f"{k}={v}" for k, v in (("SIZE", s.size_name), ("SETUP", s.setup), ("DIRECTION", s.direction),
                                                  ("LN", s.ln)) if v)
        header = [f"# λ sweep: {recipe.name} ({what}){' — QUICK MODE: tiny model, not a result' if args.quick else ''}", "",
                  f"Command: `{command}` ({stamp}); run folders: `{os.path.join(out, 'runs')}`."]
        md, csv_path = write_tables(rows, metric, out, header)
        png = plot(rows, metric, out, args.x, args.lambda_neg == ["same"],
                   title=f"{recipe.name} ({what}): λ sweep" + (" — quick mode, not a result" if args.quick else ""))
        with open(md, encoding="utf-8") as f:
            say("\n" + f.read())
        say(f"[sweep] table: {md}, {csv_path}; plot: {png}")
        if progress.failed:
            raise RecipeError(f"{len(progress.failed)} cell(s) failed: {', '.join(progress.failed)}; "
                              f"rerun the same command to retry them (finished cells are skipped)")
        if not finished:
            say("[sweep] jobs still running: the table holds the cells finished so far")
        return rows
    except RecipeError as e:  # one line, exit status 2, like the recipes' stages and argparse
        stop(f"sweep: {e}")
    except KeyboardInterrupt:
        stop("sweep: interrupted; rerun the same command to resume (finished cells are skipped, the "
             "interrupted ones go on from checkpoint_last.pt)")

