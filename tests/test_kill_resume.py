"""fairseq-train killed with SIGKILL at any moment resumes and ends exactly as an uninterrupted run.

fairseq writes the first file of a save to ``<name>.tmp`` and renames it, then copies it onto
``checkpoint_last.pt`` (and ``checkpoint_best.pt``) in place with ``shutil.copyfile``: killed
during that copy, a run leaves a truncated ``checkpoint_last.pt`` and the next one cannot resume
(``OSError: [Errno 22] Invalid argument``). The plugin makes every file of a save go through a
temporary file, fsync and ``os.replace`` (gpam_fairseq/checkpointing/glue.py).

The test trains an NMT model with trainable lambdas, dropout and a checkpoint every 4 updates
to 40 updates, and kills it several times:

* once while ``checkpoint_last.pt`` is being written, deterministically: a ``sitecustomize``
  given to that run only (test code, not the plugin's) stops the copy onto
  ``checkpoint_last.pt.tmp`` halfway, the test sees its marker and kills the process there;
  the half-written temporary file is left behind and ``checkpoint_last.pt`` still holds the
  previous complete checkpoint;
* then at random moments after training has started (seed printed, ``KILL_SEED`` to repeat).

After every kill each ``*.pt`` of the save folder is a complete checkpoint. Each restart resumes
from ``checkpoint_last.pt`` (in epoch 1 and later: fairseq alone would make a run resumed in
epoch 2 or later train on other batches, see checkpoint_glue.py), every update any leg logs
has the loss of the uninterrupted run (same data position, same RNG), and the final checkpoint
equals the uninterrupted run's, bit for bit: every tensor of the model (lambdas included) and of
the optimizer state. A restart of the finished run changes nothing (fairseq alone would train
one more update).
"""

import os
import random
import re
import signal
import subprocess
import time

import pytest

from gpam_fairseq.fairseq_glue.tools import log_records
from gpam_fairseq.checkpointing.checkpoints import file_problem, load_state
from helpers import USER_DIR
from test_resume import BIN, COMMON, ENV, MODELS, assert_same_state, data  # noqa: F401  (data: fixture)

TOTAL = 40
FLAGS = [*MODELS["nmt"], *COMMON, "--save-interval-updates", "4", "--num-workers", "0", "--max-update", str(TOTAL)]
RANDOM_KILLS = 3

PAUSE_IN_COPY = '''
"""Test hook: stop halfway through the N-th copy onto checkpoint_last.pt.tmp, once."""
import os, shutil, time

_marker = os.environ["GPAM_TEST_PAUSE_MARKER"]
_nth = int(os.environ["GPAM_TEST_PAUSE_NTH"])
_copyfileobj = shutil.copyfileobj
_seen = [0]


def copyfileobj(fsrc, fdst, length=0):
    name = getattr(fdst, "name", "")
    if not (isinstance(name, str) and name.endswith("checkpoint_last.pt.tmp")) or os.path.exists(_marker):
        return _copyfileobj(fsrc, fdst, length)
    _seen[0] += 1
    if _seen[0] < _nth:
        return _copyfileobj(fsrc, fdst, length)
    data = fsrc.read()
    fdst.write(data[: len(data) // 2])
    fdst.flush()
    with open(_marker, "w") as marker:
        marker.write(str(len(data)))
    time.sleep(300)  # the test kills the process here
    fdst.write(data[len(data) // 2:])


shutil.copyfileobj = copyfileobj
'''


def start(data_bin, save_dir, log_path, env=ENV):
    log = open(log_path, "w")
    proc = subprocess.Popen([os.path.join(BIN, "fairseq-train"), data_bin, "--user-dir", USER_DIR, *FLAGS,
                             "--save-dir", save_dir], stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc


def read(path):
    with open(path) as f:
        return f.read()


def logged_losses(text):
    """{update: loss} of a log; a killed run's last line may be cut off."""
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]
    return {int(s["num_updates"]): s["loss"] for s in log_records(lines, "train_inner")}


def wait_for(condition, proc, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    return True


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_every_checkpoint_complete(save_dir):
    for name in sorted(os.listdir(save_dir)):
        if name.endswith(".pt"):
            path = os.path.join(save_dir, name)
            assert file_problem(path) is None, f"{name}: {file_problem(path)}"
            load_state(path)


def num_updates(path):
    return load_state(path)["optimizer_history"][-1]["num_updates"]


def test_killed_runs_resume_and_end_as_the_uninterrupted_run(data, tmp_path):
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"\nKILL_SEED={seed}")
    whole_dir, split_dir = str(tmp_path / "whole"), str(tmp_path / "split")
    whole = start(data["nmt"], whole_dir, str(tmp_path / "whole.log"))  # alongside the killed legs

    # leg 1: killed halfway through writing checkpoint_last.pt (its second save)
    hook, marker = tmp_path / "hook", tmp_path / "paused_in_copy"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_IN_COPY)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")]),
               GPAM_TEST_PAUSE_MARKER=str(marker), GPAM_TEST_PAUSE_NTH="2")
    logs = [str(tmp_path / "leg1.log")]
    proc = start(data["nmt"], split_dir, logs[-1], env)
    assert wait_for(marker.exists, proc, 240, "the copy onto checkpoint_last.pt"), read(logs[-1])[-3000:]
    kill(proc)
    last, partial = os.path.join(split_dir, "checkpoint_last.pt"), os.path.join(split_dir, "checkpoint_last.pt.tmp")
    assert 0 < os.path.getsize(partial) < int(marker.read_text())  # killed while writing it
    assert_every_checkpoint_complete(split_dir)
    saved_before = num_updates(last)
    assert 0 < saved_before < max(logged_losses(read(logs[-1]))), "checkpoint_last.pt should be the previous save"
    kills = [f"while writing checkpoint_last.pt (previous save: update {saved_before})"]

    # then: restarts killed at random moments (after a random update, then a random few
    # milliseconds), one of them in the second half of the run, until one runs to the end
    targets = sorted([rng.randint(5, TOTAL) for _ in range(RANDOM_KILLS - 1)] + [rng.randint(TOTAL // 2 + 1, TOTAL)])
    while True:
        logs.append(str(tmp_path / f"leg{len(logs) + 1}.log"))
        resumed_at = num_updates(last)
        proc = start(data["nmt"], split_dir, logs[-1])
        if targets:
            target = max(targets.pop(0), resumed_at + 1)
            reached = wait_for(lambda: max(logged_losses(read(logs[-1])), default=0) >= target, proc, 240,
                               f"update {target}")
            time.sleep(rng.uniform(0.0, 0.03))
            if reached and proc.poll() is None:
                kill(proc)
                assert_every_checkpoint_complete(split_dir)
                kills.append(f"after update {max(logged_losses(read(logs[-1])))} (resumed at {resumed_at}, "
                             f"checkpoint_last.pt now at {num_updates(last)})")
                continue
        assert proc.wait(timeout=300) == 0, read(logs[-1])[-3000:]
        break
    assert whole.wait(timeout=300) == 0, read(str(tmp_path / "whole.log"))[-3000:]
    print("killed " + "; ".join(kills))
    assert len(kills) >= 2, "no random kill landed before the run ended"

    reference = logged_losses(read(str(tmp_path / "whole.log")))
    assert sorted(reference) == list(range(1, TOTAL + 1))
    resumed_epochs = []
    for n, path in enumerate(logs[1:], 2):
        loaded = re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch (\d+) @ \d+ updates\)", read(path))
        assert loaded, f"leg {n} did not resume"
        resumed_epochs.append(int(loaded.group(1)))
    assert max(resumed_epochs) >= 2, resumed_epochs  # resumed past the first epoch too: its batches are kept
    for n, path in enumerate(logs, 1):
        for update, loss in logged_losses(read(path)).items():
            assert loss == reference[update], f"leg {n}, update {update}: loss {loss}, uninterrupted {reference[update]}"

    a, b = load_state(os.path.join(whole_dir, "checkpoint_last.pt")), load_state(last)
    assert num_updates(os.path.join(whole_dir, "checkpoint_last.pt")) == num_updates(last) == TOTAL
    assert any("lambda_pos_theta" in k for k in b["model"])
    assert_same_state(a, b)  # every tensor: weights, lambdas, Adam moments and step counts
    assert not [n for n in os.listdir(whole_dir) if n.endswith(".tmp")]  # a run that ends leaves no temporary file

    # restarted once more, as after a kill between its last save and its exit: nothing changes
    # (fairseq would train update 41)
    with open(last, "rb") as f:
        final = f.read()
    again = str(tmp_path / "again.log")
    assert start(data["nmt"], split_dir, again).wait(timeout=300) == 0, read(again)[-3000:]
    assert f"resumed at update {TOTAL}, --max-update {TOTAL}: training is complete, nothing left to do" in read(again)
    assert not logged_losses(read(again))
    with open(last, "rb") as f:
        assert f.read() == final
