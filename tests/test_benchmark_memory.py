"""scripts/benchmark_memory.py: the memory ledger of one training step, by role, stock beside daGPAM."""

import csv

import pytest

from gpam_fairseq.measurement import memory_ledger
from gpam_fairseq.measurement.profiling import ROLE_LSE, ROLE_SDPA_OUT, ROLE_STACKED, ROLES


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger")
    runs = memory_ledger.main(["--quick", "--pairs", "iwslt", "--dropouts", "0.3", "--out-dir", str(out)])
    return {r["variant"]: r for r in runs}, out


def test_every_saved_byte_has_a_role_and_the_two_counts_agree(ledger):
    runs, _ = ledger
    assert list(runs) == ["stock", "dagpam", "dagpam-recompute"]
    for r in runs.values():
        assert r["saved_bytes"] == r["counter_saved_bytes"] > 0  # the ledger's own sum, the counter's
        assert sum(t["bytes"] for t in r["by_role"].values()) == r["saved_bytes"]
        assert set(r["by_role"]) == set(ROLES)
        assert r["kernels"] > 0 and r["saved_ratio"] > 0
    # the fused kernel's own tensors, as a GPU kernel keeps them; daGPAM's output holds both maps
    stock, dagpam = runs["stock"]["by_role"], runs["dagpam"]["by_role"]
    assert dagpam[ROLE_SDPA_OUT]["bytes"] > stock[ROLE_SDPA_OUT]["bytes"] > 0
    assert dagpam[ROLE_LSE]["bytes"] > 0
    # self-attention's stacked queries are rebuilt, not kept: what remains is cross attention's,
    # and none of it is a copy of another saved tensor
    assert dagpam[ROLE_STACKED]["duplicated"] == 0
    assert runs["dagpam-recompute"]["saved_bytes"] < runs["dagpam"]["saved_bytes"]


def test_the_files(ledger):
    runs, out = ledger
    md = (out / "ledger.md").read_text()
    assert "### iwslt, dropout 0.3" in md and "| **total** |" in md and "tensor by tensor" in md
    with open(out / "totals.csv") as f:
        totals = list(csv.DictReader(f))
    assert [r["variant"] for r in totals] == list(runs)
    with open(out / "ledger.csv") as f:
        tensors = list(csv.DictReader(f))
    for variant, r in runs.items():
        assert sum(int(t["bytes"]) for t in tensors if t["variant"] == variant) == r["saved_bytes"]


def test_bad_flags_name_the_flag(tmp_path):
    for argv, flag in ((["--pairs", "lm3072"], "--pairs"), (["--dropouts", "x"], "--dropouts"),
                       (["--dropouts", "1.5"], "--dropouts"), (["--variants", "diff"], "--variants")):
        with pytest.raises(SystemExit) as exc:
            memory_ledger.main([*argv, "--out-dir", str(tmp_path)])
        assert exc.value.code == 2
