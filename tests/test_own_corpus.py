"""examples/own_corpus: your own text through the four stages, as a new user runs them.

Every input is written here (a parallel corpus, .po and .mo catalogs, a TSV, documents): nothing
depends on what the machine has installed. One end-to-end run per task (translation from a .po
catalog and from plain files, both systems; language modelling, both systems) and each bad input
through the real prepare.py, expecting one line and exit status 2.
"""

import json
import os
import random
import struct

import pytest

from cli_runs import ENV, REPO, run, run_all
from gpam_fairseq.recipes import catalogs, own_corpus
from gpam_fairseq.recipes.common import RecipeError

STAGE = os.path.join(REPO, "examples", "own_corpus")
TINY_NMT = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 "
            "--encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 "
            "--decoder-attention-heads 2 --max-tokens 512 --log-interval 1")
TINY_LM = ("--decoder-layers 1 --decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2 "
           "--tokens-per-sample 16 --max-tokens 256 --log-interval 1")
FR = "le la un chat chien maison rouge bleue grande petite mange voit aime souris".split()
EN = "the the a cat dog house red blue big small eats sees loves mouse".split()


def pairs(n, seed=0):
    rng, words = random.Random(seed), dict(zip(FR, EN))
    out = []
    for _ in range(n):
        s = [rng.choice(FR) for _ in range(rng.randint(2, 7))]
        out.append((" ".join(s) + " .", " ".join(words[w] for w in s) + " ."))
    return out


def write_po(path, entries, language="fr", header=True):
    """entries: [(msgid, msgstr)], msgstr None = fuzzy."""
    lines = ['msgid ""', 'msgstr ""', '"Content-Type: text/plain; charset=UTF-8\\n"',
             f'"Language: {language}\\n"' if header else '""', ""]
    for msgid, msgstr in entries:
        if msgstr is None:
            lines += ["#, fuzzy", f'msgid "{msgid}"', 'msgstr "flou"', ""]
        else:
            lines += [f'msgid "{msgid}"', f'msgstr "{msgstr}"', ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_mo(path, entries, language="fr"):
    """A GNU .mo file (little-endian), header included, entries sorted as msgfmt sorts them."""
    table = sorted([(b"", f"Content-Type: text/plain; charset=UTF-8\nLanguage: {language}\n".encode())] +
                   [(m.encode(), t.encode()) for m, t in entries])
    n = len(table)
    originals, translations, data = 28, 28 + 8 * n, 28 + 16 * n
    blob, otab, ttab = b"", b"", b""
    for m, _ in table:
        otab += struct.pack("<2I", len(m), data + len(blob))
        blob += m + b"\0"
    for _, t in table:
        ttab += struct.pack("<2I", len(t), data + len(blob))
        blob += t + b"\0"
    with open(path, "wb") as f:
        f.write(struct.pack("<7I", 0x950412DE, 0, n, originals, translations, 0, 0) + otab + ttab + blob)


def env(tmp, **extra):
    e = dict(ENV, TASK="translation", SRC="fr", TGT="en", DATA_DIR=str(tmp / "data"), RUNS_DIR=str(tmp / "runs"),
             SAVE_DIR=str(tmp / "ckpt"), MAX_UPDATE="4", EXTRA_ARGS=TINY_NMT, BPE_SIZE="60", WORKERS="1")
    e.update({k: v for k, v in extra.items() if v is not None})
    for k in [k for k, v in extra.items() if v is None]:
        e.pop(k, None)
    return e


def stage(name, e, *args):
    return run([os.sys.executable, os.path.join(STAGE, f"{name}.py"), *map(str, args)], env=e)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def one_line_exit_2(proc, *needles):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- catalogs -------------------------------------------------------------------------------


def test_po_and_mo_give_the_same_pairs(tmp_path):
    entries = [("Open file", "Ouvrir le fichier"), ("Quit", "Quitter"), ("Untranslated", ""), ("fuzzy", None)]
    write_po(tmp_path / "fr.po", entries + [("Line\\nbreak \\\"quoted\\\"", "Ligne\\nsaut \\\"cité\\\"")])
    write_mo(tmp_path / "x.mo", [e for e in entries if e[1]] + [("Line\nbreak \"quoted\"", "Ligne\nsaut \"cité\"")])
    po, mo = catalogs.read_catalog(str(tmp_path / "fr.po")), catalogs.read_catalog(str(tmp_path / "x.mo"))
    assert po.language == mo.language == "fr"
    assert sorted(po.pairs) == sorted(mo.pairs) == sorted(
        [("Open file", "Ouvrir le fichier"), ("Quit", "Quitter"), ("Line\nbreak \"quoted\"", "Ligne\nsaut \"cité\"")])


def test_po_plurals_context_and_obsolete_entries(tmp_path):
    text = "\n".join([
        'msgid ""', 'msgstr ""', '"Language: es\\n"', "",
        'msgctxt "menu"', 'msgid "File"', 'msgstr "Archivo"', "",
        'msgid "%d file"', 'msgid_plural "%d files"', 'msgstr[0] "%d archivo"', 'msgstr[1] "%d archivos"', "",
        'msgid ""', '"Long "', '"line"', 'msgstr ""', '"Línea "', '"larga"', "",
        '#~ msgid "Gone"', '#~ msgstr "Ido"', ""])
    path = tmp_path / "po" / "es.po"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    c = catalogs.read_catalog(str(path))
    assert c.language == "es"
    assert c.pairs == [("File", "Archivo"), ("%d file", "%d archivo"), ("%d files", "%d archivos"),
                       ("Long line", "Línea larga")]


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog_corpus(tmp_path_factory):
    """A .po catalog in fr -> prepare -> preprocess -> baseline and gpam trained 4 updates -> evaluated."""
    tmp = tmp_path_factory.mktemp("own_po")
    catalog_dir = tmp / "locale" / "fr" / "LC_MESSAGES"
    catalog_dir.mkdir(parents=True)
    write_po(catalog_dir / "app.po", [(en, fr) for fr, en in pairs(300)] + [("fuzzy", None)], header=False)
    write_mo(tmp / "locale" / "es.mo", [("cat", "gato")], language="es")  # another language: left out
    e = env(tmp)
    out = {"prepare": ok(stage("prepare", e, "--catalogs", tmp / "locale")), "preprocess": ok(stage("preprocess", e))}
    out.update({f"train_{m}": ok(stage("train", dict(e, MODEL=m, SEED="1"))) for m in ("baseline", "gpam")})
    jobs = {m: dict(argv=[os.sys.executable, os.path.join(STAGE, "evaluate.py")], env=dict(e, MODEL=m, SEED="1"))
            for m in ("baseline", "gpam")}
    out.update({f"evaluate_{m}": ok(p) for m, p in run_all(jobs).items()})
    return tmp, out


def test_catalog_corpus_end_to_end(catalog_corpus):
    tmp, out = catalog_corpus
    info = json.loads((tmp / "data" / "prepared" / "own_corpus.json").read_text())
    counts = info["counts"]
    assert info["input"] == "--catalogs" and counts["split"].startswith("made here")
    assert counts["train"] + counts["valid"] + counts["test"] <= 300 and counts["valid"] >= 1 and counts["test"] >= 1
    assert "catalogs: 1 in fr" in out["prepare"] and "removed" in out["prepare"]
    provenance = json.loads((tmp / "data" / "prepared" / "provenance.json").read_text())
    assert [os.path.basename(f["path"]) for f in provenance["files"]] == ["app.po"]
    for m in ("baseline", "gpam"):
        run_json = json.loads((tmp / "runs" / f"{m}_small_postln_seed1" / "run.json").read_text())
        assert run_json["recipe"] == "own_corpus" and run_json["num_updates"] == 4
        assert run_json["test_sentences"] == counts["test"] == run_json["sentences"]
        assert f"scored {counts['test']} of {counts['test']} test sentences" in out[f"evaluate_{m}"]
        assert run_json["attention_type"] == ("softmax" if m == "baseline" else "dagpam")


def test_no_test_source_seen_in_train(catalog_corpus):
    tmp, _ = catalog_corpus
    prepared = tmp / "data" / "prepared"
    train = set((prepared / "train.raw.fr").read_text(encoding="utf-8").splitlines())
    for split in ("valid", "test"):
        assert not train & set((prepared / f"{split}.raw.fr").read_text(encoding="utf-8").splitlines())


def test_sweep_and_compare_runs_take_own_corpus(catalog_corpus, tmp_path):
    tmp, _ = catalog_corpus
    e = env(tmp, EXTRA_ARGS=None, MAX_UPDATE=None)
    sweep = run([os.sys.executable, os.path.join(REPO, "scripts", "sweep.py"), "own_corpus", "--quick", "--seeds", "1",
                 "--no-baseline", "--out", str(tmp_path / "sweep")], env=e)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "own_corpus" in (tmp_path / "sweep" / "results.md").read_text()
    runs = tmp / "runs"
    compare = run([os.sys.executable, os.path.join(REPO, "scripts", "compare_runs.py"), "--baseline",
                   str(runs / "baseline_small_postln_seed1"), str(runs / "gpam_small_postln_seed1"),
                   "--csv", str(tmp_path / "c.csv")], env=e)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "gpam_small_postln" in compare.stdout


def test_raw_dir_with_given_splits_and_lowercase(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = {"train": pairs(200, 1), "valid": pairs(15, 2), "test": pairs(15, 3)}
    data["test"][0] = data["train"][0]  # a test source seen in train: removed and counted
    for split, ps in data.items():
        (raw / f"{split}.fr").write_text("".join(s.upper() + "\n" for s, _ in ps), encoding="utf-8")
        (raw / f"{split}.en").write_text("".join(t + "\n" for _, t in ps), encoding="utf-8")
    e = env(tmp_path, LOWERCASE="1")
    ok(stage("prepare", e, "--raw-dir", raw))
    prepared = tmp_path / "data" / "prepared"
    counts = json.loads((prepared / "own_corpus.json").read_text())["counts"]
    assert counts["split"] == "given" and counts["test_source_in_train_removed"] >= 1
    assert (prepared / "train.fr").read_text(encoding="utf-8").islower()
    assert json.loads((prepared / "own_corpus.json").read_text())["lowercase"] is True


def test_tsv_input(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{t}\t{s}\n" for s, t in pairs(120, 4)), encoding="utf-8")
    ok(stage("prepare", env(tmp_path), "--tsv", tsv, "--tsv-order", "tgt-src"))
    prepared = tmp_path / "data" / "prepared"
    assert "chat" in (prepared / "train.raw.fr").read_text(encoding="utf-8") + (prepared / "test.raw.fr").read_text(encoding="utf-8")


def test_language_model_end_to_end(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(5)
    for i in range(24):  # 24 documents: split by document
        body = "\n".join(" ".join(rng.choice(EN) for _ in range(rng.randint(4, 12))) + " ." for _ in range(15))
        (docs / f"page{i}.{('rst', 'md', 'txt')[i % 3]}").write_text("Title\n=====\n\n" + body + "\n", encoding="utf-8")
    e = env(tmp_path, TASK="lm", SRC="en", TGT=None, EXTRA_ARGS=TINY_LM, BPE_SIZE="40")
    ok(stage("prepare", e, "--text", docs))
    ok(stage("preprocess", e))
    info = json.loads((tmp_path / "data" / "prepared" / "own_corpus.json").read_text())
    assert info["counts"]["documents"] == 24 and info["counts"]["split"].startswith("by document")
    for m in ("baseline", "gpam"):
        ok(stage("train", dict(e, MODEL=m, SEED="1")))
    results = run_all({m: dict(argv=[os.sys.executable, os.path.join(STAGE, "evaluate.py")],
                               env=dict(e, MODEL=m, SEED="1")) for m in ("baseline", "gpam")})
    for m, proc in results.items():
        text = ok(proc)
        run_json = json.loads((tmp_path / "runs" / f"{m}_small_seed1" / "run.json").read_text())
        assert run_json["task"] == "language_modeling" and run_json["perplexity"] > 1
        assert run_json["test_tokens"] == info["counts"]["test_tokens"]
        assert f"scored {info['counts']['test_tokens']:,} of {info['counts']['test_tokens']:,} test tokens" in text
        arch = run_json["train_command"][run_json["train_command"].index("--arch") + 1]
        assert arch == ("transformer_lm" if m == "baseline" else "transformer_lm_gpam")


# --- bad input: one line, exit 2, nothing left for a later stage ------------------------------


def _raw(tmp, src_lines, tgt_lines, raw_bytes=None):
    raw = tmp / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.fr").write_bytes(raw_bytes if raw_bytes is not None else "".join(s + "\n" for s in src_lines).encode())
    (raw / "train.en").write_text("".join(t + "\n" for t in tgt_lines), encoding="utf-8")
    return raw


def test_bad_inputs_one_line_exit_2(tmp_path):
    ps = pairs(40, 6)
    cases = {}
    cases["mismatch"] = (dict(), ["--raw-dir", _raw(tmp_path / "a", [s for s, _ in ps], [t for _, t in ps][:-1])],
                         ["train.fr has 40 lines", "train.en has 39"])
    cases["empty"] = (dict(), ["--raw-dir", _raw(tmp_path / "b", [], [t for _, t in ps], raw_bytes=b"")],
                      ["train.fr: empty file"])
    cases["not_utf8"] = (dict(), ["--raw-dir", _raw(tmp_path / "c", [], [t for _, t in ps][:2],
                                                    raw_bytes="chat\nmaison rouge \xe9t\xe9\n".encode("latin-1"))],
                         ["train.fr: line 2 is not UTF-8"])
    write_po(tmp_path / "untranslated.po", [("Open", ""), ("Quit", None)])
    cases["no_translations"] = (dict(), ["--catalogs", tmp_path / "untranslated.po"],
                                ["untranslated.po", "no translated entries"])
    cases["too_few"] = (dict(), ["--raw-dir", _raw(tmp_path / "e", [s for s, _ in ps[:3]], [t for _, t in ps[:3]])],
                        ["only 3 pairs", "too few"])
    cases["same_language"] = (dict(TGT="fr"), ["--raw-dir", _raw(tmp_path / "f", [s for s, _ in ps], [t for _, t in ps])],
                              ["SRC=fr and TGT=fr"])
    jobs = {name: dict(argv=[os.sys.executable, os.path.join(STAGE, "prepare.py"), *map(str, args)],
                       env=env(tmp_path / name, **extra)) for name, (extra, args, _) in cases.items()}
    for name, proc in run_all(jobs).items():
        one_line_exit_2(proc, *cases[name][2])
        assert not (tmp_path / name / "data" / "prepared").exists(), name
        assert not (tmp_path / name / "data" / "prepared.partial").exists(), name


def test_split_sizes():
    assert own_corpus.split_sizes(100, 0.05, 0.1) == (5, 10)
    with pytest.raises(RecipeError, match="only 10 pairs"):
        own_corpus.split_sizes(10, 0.05, 0.05)


def test_stage_progress_comes_as_it_is_printed(tmp_path):
    """run_logged (every stage's fairseq call) shows each line when the child prints it: fairseq logs
    to stdout, which Python would otherwise block-buffer into the pipe until the run ends."""
    import sys
    import time

    from gpam_fairseq.fairseq_glue.tools import run_logged

    seen = {}
    child = "import time; print('first'); time.sleep(2); print('second')"
    code, text = run_logged([sys.executable, "-c", child], str(tmp_path / "log"),
                            echo=lambda line: seen.setdefault(line.strip(), time.monotonic()) and None)
    assert code == 0 and text.split() == ["first", "second"]
    assert seen["second"] - seen["first"] > 1.5
