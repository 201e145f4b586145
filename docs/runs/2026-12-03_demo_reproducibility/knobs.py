#!/usr/bin/env python
"""Which environment knobs change the demo's trained weights on this machine.

Trains the demo's two systems (examples/quickstart/demo.py: the same MODEL_ARGS, TRAIN_ARGS and
seed, through fairseq-train), shrunk (--train-size 1000, --max-update 30), once per
configuration: the demo's pinned environment, then with one or two variables changed. Each
run's trained weights are hashed (sha256 over every tensor of checkpoint_last.pt's model, in
key order) and so are the hypotheses of a beam-5 fairseq-generate on 40 test sentences (the
H- lines, with their scores). Same hash as the baseline = bit-identical.

    python docs/runs/2026-12-03_demo_reproducibility/knobs.py OUT_DIR BASE CONFIG...

BASE: "old" (the pinning of e094725: OMP/MKL threads 1, ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2)
or "new" (the demo as it is now). CONFIG: name=VAR=value[,VAR=value...] or a bare name for the
base itself.
"""
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "examples", "quickstart", "demo.py"))
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

OLD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
KNOBS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
         "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "GLIBC_TUNABLES", "MKL_DEBUG_CPU_TYPE", "PYTHONHASHSEED")


def main():
    out, base, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data-bin")
    if not os.path.exists(os.path.join(data, "dict.src.txt")):
        demo.write_corpus(os.path.join(out, "raw"), n_train=1000, n_valid=40, n_test=40)
        raw = lambda split: os.path.join(out, "raw", split)
        subprocess.run([demo.fairseq_cli("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                        "--trainpref", raw("train"), "--validpref", raw("valid"), "--testpref", raw("test"),
                        "--destdir", data, "--workers", "1"], check=True, capture_output=True)
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS}
    pinned = OLD if base == "old" else {k: v for k, v in demo.pinned_environment().items() if k in KNOBS}
    print(f"# base {base}: {pinned}", flush=True)
    print("| config | changed | system | weights sha256 | hyps sha256 | train s |", flush=True)
    print("| --- | --- | --- | --- | --- | ---: |", flush=True)
    for config in configs:
        name, _, rest = config.partition("=")
        # VAR=value pairs separated by commas; a value may hold commas (GLIBC_TUNABLES)
        changed = dict(kv.split("=", 1) for kv in re.split(r",(?=[A-Z_]+=)", rest)) if rest else {}
        env = {**clean, **pinned, **changed}
        for system in demo.SYSTEMS:
            save = os.path.join(out, name, system)
            t0 = time.time()
            code, text = demo.run_logged(
                [demo.fairseq_cli("fairseq-train"), data, "--user-dir", demo.USER_DIR, *demo.MODEL_ARGS,
                 "--attention-type", system, *demo.TRAIN_ARGS, "--seed", "1", "--max-update", "30",
                 "--save-dir", save, "--no-epoch-checkpoints", "--disable-validation"],
                os.path.join(out, f"{name}_{system}_train.log"), env=env)
            wall = time.time() - t0
            if code != 0:
                print(f"| {name} | {rest or '-'} | {system} | train failed (exit {code}) | | |", flush=True)
                continue
            weights = demo.weights_sha256(os.path.join(save, "checkpoint_last.pt"))
            code, text = demo.run_logged(
                [demo.fairseq_cli("fairseq-generate"), data, "--user-dir", demo.USER_DIR,
                 "--path", os.path.join(save, "checkpoint_last.pt"), "--gen-subset", "test", *demo.GENERATE_ARGS],
                os.path.join(out, f"{name}_{system}_generate.log"), env=env)
            hyps = hashlib.sha256("".join(l + "\n" for l in text.splitlines() if l.startswith("H-")).encode()).hexdigest()
            print(f"| {name} | {rest or '-'} | {system} | {weights[:16]} | {hyps[:16]} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
