"""How a λ sweep's cells run: one after the other in this process, in ``--parallel N`` worker processes
(``python -m gpam_fairseq.recipes.sweep run-cell SPEC``, one per visible GPU), or as a SLURM job array
through submitit; with the cell i/N progress lines and their ETA."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from gpam_fairseq.fairseq_glue.tools import REPO_ROOT, say
from gpam_fairseq.recipes.common import RecipeError, stop
from gpam_fairseq.recipes.sweep.grid import _status_text, run_cell


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


def _worker(spec_path):
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        outcome = run_cell(spec)
    except RecipeError as e:
        stop(f"sweep cell {spec['run_name']}: {e}")
    with open(_outcome_path(spec_path), "w", encoding="utf-8") as f:
        json.dump(outcome, f, indent=1)
    return 0
