#!/usr/bin/env python
"""Which math libraries the demo's training calls, and in which MKL mode: two updates of the demo's
dagpam fairseq-train (shrunk corpus) under MKL_VERBOSE=1 and ONEDNN_VERBOSE=all, once with the
pinning of e094725 (MKL_CBWR=AVX2) and once with the demo's pinning now; counts MKL's calls by
function and by its reported CNR mode, and oneDNN's verbose lines (0: no oneDNN primitive ran).

    python docs/runs/2026-12-03_demo_reproducibility/libraries_called.py WORK_DIR
"""
import collections
import importlib.util
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "examples", "quickstart", "demo.py"))
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

work = sys.argv[1]
data = os.path.join(work, "data-bin")
if not os.path.exists(os.path.join(data, "dict.src.txt")):
    demo.write_corpus(os.path.join(work, "raw"), n_train=300, n_valid=20, n_test=20)
    subprocess.run([demo.fairseq_cli("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                    "--trainpref", f"{work}/raw/train", "--validpref", f"{work}/raw/valid", "--destdir", data],
                   check=True, capture_output=True)
old = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
new = {k: v for k, v in demo.pinned_environment().items() if k in demo.PINNED_NAMES}
for name, pinned in (("pinning of e094725", old), ("pinning now", new)):
    env = {**{k: v for k, v in os.environ.items() if k not in demo.PINNED_NAMES}, **pinned,
           "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "all"}
    proc = subprocess.run([demo.fairseq_cli("fairseq-train"), data, "--user-dir", demo.USER_DIR, *demo.MODEL_ARGS,
                           "--attention-type", "dagpam", *demo.TRAIN_ARGS, "--seed", "1", "--max-update", "2",
                           "--no-save", "--disable-validation"], env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    mkl = [line for line in text.splitlines() if line.startswith("MKL_VERBOSE")]
    print(f"## {name}: {pinned}; fairseq-train exit {proc.returncode}")
    print(f"MKL: {mkl[0] if mkl else 'no MKL_VERBOSE line'}")
    print("MKL calls by function:", dict(collections.Counter(re.match(r"MKL_VERBOSE (\w+)", l).group(1) for l in mkl[1:])))
    print("MKL calls by CNR mode:", dict(collections.Counter(m.group(1) for l in mkl if (m := re.search(r"CNR:(\S+)", l)))))
    print("oneDNN verbose lines:", sum("onednn_verbose" in l.lower() for l in text.splitlines()))
    print()
