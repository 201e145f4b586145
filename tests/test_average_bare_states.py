"""Averaging accepts what fairseq's own scripts/average_checkpoints.py accepts: files holding only
{"model": state_dict} (no best_loss, no cfg, no optimizer history), double and integer tensors,
parameters shared between two names; through the function and through the script."""

import collections
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import REPO

import average_checkpoints  # noqa: E402  (scripts/, on the path through conftest.py)

SCRIPT = os.path.join(REPO, "scripts", "average_checkpoints.py")


def test_bare_model_states_with_double_and_integer_tensors(tmp_path):
    states = [
        collections.OrderedDict([("a", torch.DoubleTensor([100.0])), ("b", torch.FloatTensor([[1.0, 2.0], [3.0, 4.0]])),
                                 ("c", torch.IntTensor([7, 8, 9])), ("h", torch.tensor([1.0, 3.0], dtype=torch.float16))]),
        collections.OrderedDict([("a", torch.DoubleTensor([1.0])), ("b", torch.FloatTensor([[1.0, 1.0], [1.0, 1.0]])),
                                 ("c", torch.IntTensor([2, 2, 2])), ("h", torch.tensor([2.0, 4.0], dtype=torch.float16))]),
    ]
    paths = []
    for i, params in enumerate(states):
        path = str(tmp_path / f"m{i}")  # no .pt suffix, as tempfile.mkstemp names them
        torch.save(collections.OrderedDict([("model", params)]), path)
        paths.append(path)
    out = average_checkpoints.average_checkpoints(paths)["model"]
    assert list(out) == ["a", "b", "c", "h"]
    assert out["a"].dtype == torch.float64 and out["a"].item() == 50.5
    torch.testing.assert_close(out["b"], torch.FloatTensor([[1.0, 1.5], [2.0, 2.5]]), rtol=0, atol=0)
    assert out["c"].dtype == torch.int32 and out["c"].tolist() == [4, 5, 5]  # floor division, as fairseq
    assert out["h"].dtype == torch.float32 and out["h"].tolist() == [1.5, 3.5]  # fp16 upcast first, as fairseq


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = nn.Parameter(self.fc1.weight)  # one tensor under two names


def test_shared_parameters_and_the_script_on_bare_files(tmp_path):
    models, paths = [], []
    for value in (1.0, 2.0, 3.0):
        m = Shared()
        nn.init.constant_(m.fc1.weight, value)
        path = str(tmp_path / f"m{value:g}.pt")
        torch.save({"model": m.state_dict()}, path)
        models.append(m)
        paths.append(path)
    avg = average_checkpoints.average_checkpoints(paths)["model"]
    for key in ("embedding.weight", "fc1.weight", "fc2.weight", "fc2.bias"):
        want = sum(dict(m.named_parameters(remove_duplicate=False))[key].detach() for m in models) / 3
        assert torch.equal(avg[key], want), key
    assert torch.equal(avg["fc1.weight"], torch.full((8, 8), 2.0))

    out = str(tmp_path / "avg.pt")
    proc = subprocess.run([sys.executable, SCRIPT, "--inputs", *paths, "--output", out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(out, map_location="cpu")
    assert set(saved) == {"model"} and torch.equal(saved["model"]["fc1.weight"], torch.full((8, 8), 2.0))


def test_a_file_without_model_parameters_is_one_line(tmp_path):
    path = str(tmp_path / "notes.pt")
    torch.save({"weights": {}}, path)
    proc = subprocess.run([sys.executable, SCRIPT, "--inputs", path, path, "--output", str(tmp_path / "o.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "o.pt").exists()
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].endswith(f'{path}: holds no "model" dictionary of parameters; pass fairseq checkpoints or files '
                              f'saved as torch.save({{"model": model.state_dict()}}, path)'), proc.stderr
    with pytest.raises(Exception, match="holds no"):
        average_checkpoints.average_checkpoints([path])
