"""λ sweeps: a grid of daGPAM settings × seeds for one recipe, through the recipe's own stages.

Every cell of the grid is one recipe run (the train and evaluate stages of
:mod:`gpam_fairseq.recipes.stages`, with MODEL, SEED, RUN_NAME and GPAM_ARGS set for it) in
the sweep's folder: ``<out>/runs/<run>`` (run folders as the recipes write them) and
``<out>/checkpoints/<run>``. The baseline (and, if asked, baseline_params / baseline_maps) runs
with the same seeds are cells too, so that the table and the plot are computed from runs.

A cell is *done* when its run folder holds a finished evaluation of a training whose
``--max-update`` is the sweep's: it is skipped. A cell whose training was interrupted resumes
from its ``checkpoint_last.pt`` (fairseq's own resume: same ``--save-dir``); one trained to a
smaller ``--max-update`` than the sweep's is trained on from its last checkpoint to the new one
and evaluated again. The cells run in this process one after the other, in ``--parallel N``
worker processes (one per visible GPU, ``CUDA_VISIBLE_DEVICES`` set for each), or as a job
array through submitit (``--slurm``); results are read from the run folders whichever ran them.

The cell function is :func:`run_cell`: it takes a JSON-able spec (recipe, environment, target
updates) and returns what it did, so that submitit can pickle it by reference.
"""

import argparse
import csv
import datetime
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT, say
from gpam_fairseq.recipes import controls
from gpam_fairseq.recipes.common import RecipeError, done_marker, env, env_args, last_flag
from gpam_fairseq.recipes.definitions import RECIPES

# --quick: a tiny model and a few updates, on the fixture or any small data (CPU, minutes)
QUICK_NMT = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
             "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
             "--decoder-attention-heads 2 --max-tokens 1024 --warmup-updates 5 --lr 3e-3 --no-epoch-checkpoints "
             "--log-interval 2")
QUICK_LM = ("--decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "
            "--tokens-per-sample 32 --max-tokens 512 --warmup-updates 2 --no-epoch-checkpoints --log-interval 2")
QUICK_MAX_UPDATE = 10

# the recipe variables a cell takes from the sweep's environment (so that a job on another
# machine sees the same; see gpam_fairseq/recipes/stages.py)
PASSED_ON = ("SIZE", "SETUP", "DIRECTION", "LN", "DATA_DIR", "NGPUS", "PRECISION", "FP16", "UPDATE_FREQ", "AVERAGE", "WORKERS",
             "MAX_UPDATE", "EVAL_ARGS", "EXTRA_ARGS", "GPAM_ARGS")


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Setting:
    """One system of the grid: a baseline, or daGPAM with its settings."""

    model: str  # "gpam", or one of controls.BASELINES
    lambda_pos: Optional[float] = None
    lambda_neg: Optional[float] = None
    trainable: bool = False
    neg_query_init: str = "neg_identity"
    neg_query: str = "shared"
    blocks: str = "all"

    @property
    def is_gpam(self):
        return self.model == "gpam"

    def tag(self) -> str:
        if not self.is_gpam:
            return self.model
        init = {"neg_identity": "negid", "random": "random"}[self.neg_query_init]
        sharing = {"shared": "shared", "per_head": "perhead"}[self.neg_query]
        return (f"gpam_lp{self.lambda_pos:g}_ln{self.lambda_neg:g}_{'trainable' if self.trainable else 'fixed'}_"
                f"{init}_{sharing}_{self.blocks.replace(',', '+')}")

    def gpam_args(self) -> List[str]:
        if not self.is_gpam:
            return []
        args = ["--gpam-lambda-pos", f"{self.lambda_pos:g}", "--gpam-lambda-neg", f"{self.lambda_neg:g}",
                "--gpam-neg-query-init", self.neg_query_init, "--gpam-neg-query", self.neg_query]
        if self.trainable:
            args.append("--gpam-trainable-lambda")
        if self.blocks != "all":
            args += ["--gpam-blocks", self.blocks]
        return args


@dataclass
class Cell:
    setting: Setting
    seed: int
    run_name: str
    run_dir: str
    save_dir: str
    spec: Dict


def _floats(values, flag):
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise RecipeError(f"{flag} {v!r}: expected numbers, e.g. {flag} 0.1 0.2 0.5") from None
    return out


def grid_settings(args, recipe) -> List[Setting]:
    """The daGPAM settings of the grid (λ+ × λ− × trainable × init × sharing × blocks), validated
    by the options' own rules, then the baselines."""
    from gpam_fairseq.options import (LM_ROLES, NEG_QUERY_INITS, NEG_QUERY_SHARING, NMT_ROLES, GPAMConfigError,
                                      gpam_options_from_args)

    roles = NMT_ROLES if recipe.task == "translation" else LM_ROLES
    pos = _floats(args.lambda_pos, "--lambda-pos")
    tied = args.lambda_neg == ["same"]
    neg = None if tied else _floats(args.lambda_neg, "--lambda-neg")
    for flag, values, allowed in (("--neg-query-init", args.neg_query_init, NEG_QUERY_INITS),
                                  ("--neg-query", args.neg_query, NEG_QUERY_SHARING),
                                  ("--lambda", args.lambda_mode, ("fixed", "trainable"))):
        for v in values:
            if v not in allowed:
                raise RecipeError(f"{flag} {v!r}: choose from {', '.join(allowed)}")
    settings = []
    for lp, ln, mode, init, sharing, blocks in itertools.product(
            pos, [None] if tied else neg, args.lambda_mode, args.neg_query_init, args.neg_query, args.blocks):
        s = Setting("gpam", lp, lp if tied else ln, mode == "trainable", init, sharing, blocks)
        ns = argparse.Namespace(attention_type="dagpam", gpam_lambda_pos=s.lambda_pos, gpam_lambda_neg=s.lambda_neg,
                                gpam_trainable_lambda=s.trainable, gpam_neg_query_init=init, gpam_neg_query=sharing,
                                gpam_blocks=",".join(roles) if blocks == "all" else blocks)
        try:
            gpam_options_from_args(ns, roles)
        except GPAMConfigError as e:
            raise RecipeError(f"grid cell {s.tag()}: {e} (from --lambda-pos/--lambda-neg/--lambda/--blocks)") from None
        settings.append(s)
    baselines = ([] if args.no_baseline else ["baseline"]) + list(args.controls)
    for b in baselines:
        if b not in controls.BASELINES:
            raise RecipeError(f"--controls {b!r}: choose from {', '.join(controls.CONTROLS)}")
    return settings + [Setting(b) for b in dict.fromkeys(baselines)]


def cell_environment(args, recipe_name, setting, seed, out) -> Dict[str, Optional[str]]:
    """The environment of one cell: the sweep's recipe variables, then the cell's own."""
    cell = {k: os.environ[k] for k in PASSED_ON if os.environ.get(k) not in (None, "")}
    if cell.get("DATA_DIR"):
        cell["DATA_DIR"] = os.path.abspath(cell["DATA_DIR"])
    extra = shlex.split(cell.get("EXTRA_ARGS", ""))
    if args.quick:
        recipe = RECIPES[recipe_name]
        extra = shlex.split(QUICK_NMT if recipe.task == "translation" else QUICK_LM) + _quick_adaptive(args, recipe) + extra
        cell.setdefault("UPDATE_FREQ", "1")
        cell.setdefault("AVERAGE", "0")
        quick_eval = (["--max-len-a", "1", "--max-len-b", "5"] if recipe.task == "translation" else
                      ["--tokens-per-sample", "32", "--context-window", "16"] + (
                          ["--softmax-batch", "64"] if _adaptive(args, recipe) else []))
        cell["EVAL_ARGS"] = shlex.join(quick_eval + shlex.split(cell.get("EVAL_ARGS", "")))
    extra += shlex.split(args.extra_args)
    gpam = env_args("GPAM_ARGS") + shlex.split(args.gpam_args) + setting.gpam_args()
    cell.update(MODEL=setting.model, SEED=str(seed), EXTRA_ARGS=shlex.join(extra), GPAM_ARGS=shlex.join(gpam),
                RUNS_DIR=os.path.join(out, "runs"), SAVE_DIR=os.path.join(out, "checkpoints"), FORCE=None)
    if args.max_update:
        cell["MAX_UPDATE"] = str(args.max_update)
    elif args.quick and "MAX_UPDATE" not in cell:
        cell["MAX_UPDATE"] = str(QUICK_MAX_UPDATE)
    return cell


def _size(args, recipe):
    return os.environ.get("SIZE") or recipe.default_size


def _adaptive(args, recipe):
    return "adaptive_loss" in recipe.sizes[_size(args, recipe)].train


def _quick_adaptive(args, recipe):
    """Adaptive input/softmax cutoffs below the size of the data's dictionary (the official
    cutoffs need a vocabulary of 60,000 words at least)."""
    if not _adaptive(args, recipe):
        return []
    from gpam_fairseq.recipes.stages import Settings

    with controls.environment(MODEL="baseline"):
        dict_path = os.path.join(Settings(recipe).data_bin, "dict.txt")
    try:
        with open(dict_path, encoding="utf-8") as f:
            vocab = sum(1 for _ in f) + 4
    except OSError:
        raise RecipeError(f"{dict_path}: missing; run the recipe's prepare.py and preprocess.py first") from None
    cutoffs = f"{max(2, vocab // 3)},{max(3, 2 * vocab // 3)}"
    return ["--adaptive-input-cutoff", cutoffs, "--adaptive-softmax-cutoff", cutoffs]


def build_cells(args, recipe, out) -> List[Cell]:
    from gpam_fairseq.recipes.stages import Settings

    cells = []
    for setting in grid_settings(args, recipe):
        for seed in args.seeds:
            cell_env = cell_environment(args, recipe.name, setting, seed, out)
            # the recipe's run name with the setting's tag instead of the model
            with controls.environment(**{**cell_env, "MODEL": "baseline", "RUN_NAME": None}):
                default = Settings(recipe).run_name
            run_name = setting.tag() + default[len("baseline"):]
            cell_env["RUN_NAME"] = run_name
            with controls.environment(**cell_env):
                s = Settings(recipe)
                target = int(env("MAX_UPDATE", s.size.max_update))
            spec = {"recipe": recipe.name, "env": cell_env, "max_update": target, "run_name": run_name}
            cells.append(Cell(setting, seed, run_name, s.run_dir, s.save_dir, spec))
    return cells


# ----------------------------------------------------------------------------- one cell


def _recorded_max_update(run_dir) -> Optional[int]:
    try:
        with open(done_marker(run_dir, "train"), encoding="utf-8") as f:
            cmd = json.load(f).get("command") or []
    except (OSError, ValueError):
        return None
    value = last_flag(cmd, "--max-update")
    return int(value) if value is not None else None


def cell_status(run_dir, save_dir, target) -> str:
    """done | extend (trained to fewer updates than target) | resume (interrupted) | new."""
    trained = _recorded_max_update(run_dir)
    if trained is not None and trained < target:
        return "extend"
    if os.path.exists(done_marker(run_dir, "evaluate")) and trained is not None:
        return "done"
    if trained is not None:
        return "evaluate"  # trained, not evaluated
    if os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
        return "resume"
    return "new"


def _status_text(cell: Cell) -> str:
    """What will be done with a cell, now (see :func:`cell_status`)."""
    from gpam_fairseq.recipes.stages import training_figures

    run_dir, target = cell.run_dir, cell.spec["max_update"]
    status = cell_status(run_dir, cell.save_dir, target)
    if status == "extend":
        return f"extend: trained to {_recorded_max_update(run_dir)} of {target} updates, goes on from checkpoint_last.pt"
    if status == "resume":
        done = training_figures(run_dir).get("num_updates") if os.path.isdir(run_dir) else None
        return f"resume from checkpoint_last.pt (interrupted{f' after update {done}' if done else ''})"
    return {"new": "new", "done": "done", "evaluate": "trained, evaluate only"}[status]


def run_cell(spec: Dict) -> Dict:
    """Run one cell through the recipe's train and evaluate stages (skipping what is done).
    spec: {"recipe", "env", "max_update", "run_name"} (see build_cells). Returns
    {"run_name", "status", "seconds", "result"} with the run.json contents."""
    from gpam_fairseq.recipes import stages

    start = time.time()
    with controls.environment(**spec["env"]):
        s = stages.Settings(RECIPES[spec["recipe"]])
        status = cell_status(s.run_dir, s.save_dir, spec["max_update"])
        if status != "done":
            if status == "extend":  # train on from checkpoint_last.pt to the new --max-update
                for stage in ("train", "evaluate"):
                    if os.path.exists(done_marker(s.run_dir, stage)):
                        os.remove(done_marker(s.run_dir, stage))
            stages.stage_train(s, [])
            stages.stage_evaluate(s, [])
        with open(os.path.join(s.run_dir, "run.json"), encoding="utf-8") as f:
            result = json.load(f)
    return {"run_name": spec["run_name"], "status": "skipped" if status == "done" else status,
            "seconds": time.time() - start, "result": result}


# ----------------------------------------------------------------------------- running the grid


class GridProgress:
    """cell i/N lines with the status, the time a cell took and an ETA for the rest."""

    def __init__(self, cells, parallel):
        self.n, self.parallel = len(cells), max(1, parallel)
        self.finished, self.durations, self.failed = 0, [], []
        self.index = {c.run_name: i + 1 for i, c in enumerate(cells)}

    def started(self, cell, status_text):
        say(f"[sweep] cell {self.index[cell.run_name]}/{self.n} {cell.run_name}: {status_text}")

    def done(self, cell, outcome: Optional[Dict], error: Optional[str] = None, log: Optional[str] = None):
        self.finished += 1
        i = self.index[cell.run_name]
        if error:
            self.failed.append(cell.run_name)
            say(f"[sweep] cell {i}/{self.n} {cell.run_name}: FAILED ({error}){f'; log: {log}' if log else ''}")
        else:
            seconds = outcome["seconds"]
            if outcome["status"] != "skipped":
                self.durations.append(seconds)
            metric = _metric_text(outcome["result"])
            say(f"[sweep] cell {i}/{self.n} {cell.run_name}: {outcome['status']}{'' if outcome['status'] == 'skipped' else ' -> done'} "
                f"in {seconds:.0f} s{f' ({metric})' if metric else ''}")
        left = self.n - self.finished
        eta = (f", ETA {_duration(statistics.mean(self.durations) * left / self.parallel)}"
               if self.durations and left else "")
        say(f"[sweep] {self.finished}/{self.n} cells finished{f', {len(self.failed)} failed' if self.failed else ''}{eta}")


def _duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _metric_text(result):
    for key in ("bleu", "bpc", "perplexity"):
        if result.get(key) is not None:
            return f"{key} {result[key]:.2f}"
    return ""


def run_in_process(cells, progress):
    for cell in cells:
        progress.started(cell, _status_text(cell))
        try:
            outcome = run_cell(cell.spec)
        except RecipeError as e:
            progress.done(cell, None, error=str(e).splitlines()[0])
            continue
        progress.done(cell, outcome)


def visible_gpus() -> List[str]:
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        return [i for i in ids.split(",") if i.strip() not in ("", "-1")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def run_parallel(cells, progress, parallel, out):
    """N worker processes at once, each running one cell (python -m gpam_fairseq.recipes.sweep
    run-cell SPEC); one GPU each where GPUs are visible."""
    gpus = visible_gpus()
    if gpus and parallel > len(gpus):
        raise RecipeError(f"--parallel {parallel}: only {len(gpus)} GPU(s) visible "
                          f"({', '.join(gpus)}); one cell runs per GPU: use --parallel {len(gpus)} or fewer")
    cell_dir, log_dir = os.path.join(out, "cells"), os.path.join(out, "logs")
    os.makedirs(cell_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    free, running, pending = list(range(parallel)), {}, list(cells)
    last_beat = time.time()
    try:
        while pending or running:
            while pending and free:
                cell, slot = pending.pop(0), free.pop(0)
                spec_path = os.path.join(cell_dir, cell.run_name + ".json")
                with open(spec_path, "w", encoding="utf-8") as f:
                    json.dump(cell.spec, f, indent=1)
                if os.path.exists(_outcome_path(spec_path)):
                    os.remove(_outcome_path(spec_path))
                worker_env = dict(os.environ)
                if gpus:
                    worker_env["CUDA_VISIBLE_DEVICES"] = gpus[slot]
                elif "OMP_NUM_THREADS" not in worker_env:  # CPU: share the cores instead of oversubscribing
                    worker_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
                log_path = os.path.join(log_dir, cell.run_name + ".log")
                progress.started(cell, _status_text(cell) + (f" (GPU {gpus[slot]})" if gpus else f" (worker {slot + 1})"))
                log = open(log_path, "w", encoding="utf-8")
                proc = subprocess.Popen([sys.executable, "-m", "gpam_fairseq.recipes.sweep", "run-cell", spec_path],
                                        stdout=log, stderr=subprocess.STDOUT, env=worker_env, cwd=REPO_ROOT)
                running[proc.pid] = (proc, cell, slot, log, log_path, time.time())
            time.sleep(0.5)
            for pid, (proc, cell, slot, log, log_path, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[pid]
                free.append(slot)
                outcome_path = _outcome_path(os.path.join(cell_dir, cell.run_name + ".json"))
                if proc.returncode == 0 and os.path.exists(outcome_path):
                    with open(outcome_path, encoding="utf-8") as f:
                        progress.done(cell, json.load(f))
                else:
                    progress.done(cell, None, error=f"exit {proc.returncode}: {_last_line(log_path)}", log=log_path)
            if running and time.time() - last_beat > 60:
                last_beat = time.time()
                for proc, cell, slot, log, log_path, started in running.values():
                    say(f"[sweep]   running {cell.run_name} for {_duration(time.time() - started)}: {_last_line(log_path)}")
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            proc.terminate()
        raise


def _outcome_path(spec_path):
    return spec_path[:-len(".json")] + ".outcome.json"


def _last_line(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
        return lines[-1][-200:] if lines else "(no output yet)"
    except OSError:
        return "(no log)"


def run_submitit(cells, progress, args, out):
    """The cells as one job array through submitit (SLURM, or its local executor for tests)."""
    try:
        import submitit
    except ImportError:
        raise RecipeError("--slurm needs submitit: pip install submitit (or pip install -e '.[test]')") from None
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise RecipeError("--slurm: no sbatch on PATH; run the sweep on a SLURM login node, or add --cluster local "
                          "to run the same job array on this machine")
    folder = os.path.join(out, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    params = dict(timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus_per_node, nodes=1, tasks_per_node=1,
                  cpus_per_task=args.slurm_cpus_per_task, name=f"sweep_{os.path.basename(os.path.normpath(out))}",
                  slurm_array_parallelism=args.slurm_array_parallelism)
    if args.slurm_mem_gb:
        params["mem_gb"] = args.slurm_mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(args, f"slurm_{key}")
        if value:
            params[f"slurm_{key}"] = value
    executor.update_parameters(**params)
    for cell in cells:
        progress.started(cell, _status_text(cell) + " (submitted)")
    jobs = executor.map_array(run_cell, [c.spec for c in cells])
    say(f"[sweep] {len(jobs)} job(s) submitted ({args.cluster}): {', '.join(j.job_id for j in jobs[:3])}"
        f"{' ...' if len(jobs) > 3 else ''}; submitit logs in {os.path.dirname(folder)}")
    if args.no_wait:
        say("[sweep] --no-wait: rerun the same command with --collect once the jobs have finished")
        return False
    waiting = dict(zip([j.job_id for j in jobs], zip(jobs, cells)))
    while waiting:
        time.sleep(1)
        for job_id, (job, cell) in list(waiting.items()):
            if not job.done():
                continue
            del waiting[job_id]
            try:
                progress.done(cell, job.result())
            except Exception as e:  # submitit re-raises the job's exception (FailedJobError, RecipeError)
                progress.done(cell, None, error=str(e).strip().splitlines()[-1][:300], log=str(job.paths.stdout))
    return True


# ----------------------------------------------------------------------------- results


def metric_of(recipe):
    """(run.json key, title, higher is better) of the recipe's main metric."""
    if recipe.task == "translation":
        return "bleu", "BLEU", True
    if recipe.bits_per_char:
        return "bpc", "bits/char", False
    return "perplexity", "perplexity", False


def best_valid_loss(run_dir) -> Optional[float]:
    """The lowest validation loss (base 2) fairseq-train logged for the run, over all its train logs."""
    import glob

    from gpam_fairseq.fairseq_glue.tools import log_records

    losses = []
    for path in glob.glob(os.path.join(run_dir, "train*.log")):
        with open(path, encoding="utf-8") as f:
            losses += [float(r["valid_loss"]) for r in log_records(f, "valid")]
    return min(losses) if losses else None


def collect(cells, recipe):
    """One row per setting: the metric's mean ± std over the seeds whose run folder has a run.json,
    and the best validation loss's (the figure to choose λ by: the metric is the test set's)."""
    key, title, higher = metric_of(recipe)
    rows = []
    for setting in dict.fromkeys(c.setting for c in cells):
        members = [c for c in cells if c.setting == setting]
        values, params, seeds, valid = [], [], [], []
        for c in members:
            path = os.path.join(c.run_dir, "run.json")
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            if result.get(key) is None:
                continue
            values.append(float(result[key]))
            params.append(result.get("params"))
            seeds.append(c.seed)
            loss = best_valid_loss(c.run_dir)
            if loss is not None:
                valid.append(loss)
        rows.append({"setting": setting.tag(), **asdict(setting), "seeds": seeds, "n": len(values),
                     "missing_seeds": [c.seed for c in members if c.seed not in seeds],
                     "mean": statistics.mean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else None,
                     "valid_mean": statistics.mean(valid) if valid else None,
                     "valid_std": statistics.stdev(valid) if len(valid) > 1 else None,
                     "params": params[0] if params and len(set(params)) == 1 else None})
    base = next((r for r in rows if r["model"] == "baseline" and r["mean"] is not None), None)
    for r in rows:
        r["delta"] = r["mean"] - base["mean"] if base and r["mean"] is not None else None
    return rows, (key, title, higher)


def _fmt(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}"


def write_tables(rows, metric, out, header_lines):
    key, title, higher = metric
    md_path, csv_path = os.path.join(out, "results.md"), os.path.join(out, "results.csv")
    lines = [*header_lines, "",
             f"Metric: test {title} ({'higher' if higher else 'lower'} is better), mean ± std over the seeds present; "
             f"Δ: difference of the means to the baseline's; best valid loss: the lowest validation loss (base 2) "
             f"of each run, mean ± std (choose λ by it, not by the test metric); parameters: fairseq's count.", "",
             f"| setting | model | λ+ | λ− | λ | W_Q− init | W_Q− | blocks | seeds | {title} | Δ vs baseline | "
             f"best valid loss | parameters |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gpam = r["model"] == "gpam"
        value = "" if r["mean"] is None else _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] is not None else "")
        seeds = ", ".join(map(str, r["seeds"]))
        if r["missing_seeds"]:
            seeds += f" (missing {', '.join(map(str, r['missing_seeds']))})"
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        valid = "" if r["valid_mean"] is None else _fmt(r["valid_mean"], 3) + (
            f" ± {_fmt(r['valid_std'], 3)}" if r["valid_std"] is not None else "")
        params = "" if r["params"] is None else f"{r['params']:,}"
        if gpam:
            knobs = [_fmt(r["lambda_pos"], 3), _fmt(r["lambda_neg"], 3), "trainable" if r["trainable"] else "fixed",
                     r["neg_query_init"], r["neg_query"], r["blocks"]]
        else:
            knobs = ["—"] * 6
        lines.append("| " + " | ".join([r["setting"], r["model"], *knobs, seeds, value, delta, valid, params]) + " |")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    fields = ["setting", "model", "lambda_pos", "lambda_neg", "trainable", "neg_query_init", "neg_query", "blocks",
              "seeds", "n", "missing_seeds", f"{key}_mean", f"{key}_std", "delta_vs_baseline", "best_valid_loss_mean",
              "best_valid_loss_std", "params"]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow([r["setting"], r["model"], r["lambda_pos"], r["lambda_neg"], r["trainable"] if r["model"] == "gpam" else "",
                        r["neg_query_init"] if r["model"] == "gpam" else "", r["neg_query"] if r["model"] == "gpam" else "",
                        r["blocks"] if r["model"] == "gpam" else "", " ".join(map(str, r["seeds"])), r["n"],
                        " ".join(map(str, r["missing_seeds"])), r["mean"], r["std"], r["delta"], r["valid_mean"],
                        r["valid_std"], r["params"]])
    return md_path, csv_path


def plot(rows, metric, out, x_name, tied, title=""):
    """The metric against λ, one line per combination of the other settings, error bars = std
    over seeds; each baseline as a band of its mean ± std."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging setup would print its font search

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, title, higher = metric
    other = [k for k in ("lambda_neg", "lambda_pos", "trainable", "neg_query_init", "neg_query", "blocks")
             if k != x_name and not (tied and k in ("lambda_pos", "lambda_neg"))]
    lines = {}
    for r in rows:
        if r["model"] == "gpam" and r["mean"] is not None:
            lines.setdefault(tuple(r[k] for k in other), []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = {"lambda_neg": "λ−", "lambda_pos": "λ+", "neg_query_init": "W_Q− init", "neg_query": "W_Q−", "blocks": "blocks"}
    for i, (combo, members) in enumerate(lines.items()):
        members.sort(key=lambda r: r[x_name])
        label = ", ".join(("trainable λ" if v else "fixed λ") if k == "trainable" else f"{names[k]} {v:g}" if
                          isinstance(v, float) else f"{names[k]} {v}" for k, v in zip(other, combo))
        ax.errorbar([r[x_name] for r in members], [r["mean"] for r in members],
                    yerr=[r["std"] or 0.0 for r in members], marker="o", capsize=4, color=f"C{i}", label=label)
    for j, r in enumerate(r for r in rows if r["model"] != "gpam" and r["mean"] is not None):
        color = ["0.35", "tab:brown", "tab:pink"][j % 3]
        std = r["std"] or 0.0
        ax.axhspan(r["mean"] - std, r["mean"] + std, color=color, alpha=0.18, lw=0)
        ax.axhline(r["mean"], color=color, ls="--", lw=1.2,
                   label=f"{r['model']}: mean ± std over seeds {', '.join(map(str, r['seeds']))}")
    if tied:
        xlabel = "λ (λ+ = λ−)"
    else:
        xlabel = names[x_name]
    if any(r["model"] == "gpam" and r["trainable"] for r in rows):
        xlabel += " (initial value where trainable)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{title} ({'higher' if higher else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "results.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def parser():
    p = argparse.ArgumentParser(
        prog="scripts/sweep.py", description="A grid of daGPAM settings x seeds for one recipe, with its baselines.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("recipe", choices=sorted(RECIPES))
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
    recipe = RECIPES[args.recipe]
    out = os.path.abspath(args.out or os.path.join(REPO_ROOT, "sweeps", recipe.name + ("_quick" if args.quick else "")))
    try:
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
    except RecipeError as e:
        sys.exit(f"sweep: {e}")
    except KeyboardInterrupt:
        sys.exit("sweep: interrupted; rerun the same command to resume (finished cells are skipped, the "
                 "interrupted ones go on from checkpoint_last.pt)")


def _worker(spec_path):
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        outcome = run_cell(spec)
    except RecipeError as e:
        sys.exit(f"sweep cell {spec['run_name']}: {e}")
    with open(_outcome_path(spec_path), "w", encoding="utf-8") as f:
        json.dump(outcome, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
