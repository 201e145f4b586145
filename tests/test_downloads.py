"""The recipes' downloads against a local HTTP server (stdlib http.server on 127.0.0.1, in this
process): sources tried in order, a cut connection resumed with HTTP Range, wrong bytes and HTML
pages refused with one line (exit status 2) and nothing left under the final name, hand-placed
files used without network (and refused when corrupted), trust on first use, --mirror,
--only-mirrors, provenance, --list-sources [--json] of every recipe, and the scaling_nmt data
rebuilt from fixture archives in the statmt formats. No test reaches the internet: the recipes'
source tables are pointed at the local server (monkeypatch), or only --mirror URLs are used.
"""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli_runs import ENV, run_all
from helpers import REPO
from test_recipes import seg_file, sentence_pairs

from gpam_fairseq.recipes import sources as S
from gpam_fairseq.recipes import stages
from gpam_fairseq.recipes.common import RecipeError
from gpam_fairseq.recipes.downloads import USER_AGENT, SourceFile, TrustStore, fetch, looks_like_html


class Server:
    """Routes: path -> dict(data=bytes, status=int, html=bool, cut_after=int (first request only),
    redirect=path, ignore_range=bool). Every request is logged as (path, Range header, User-Agent)."""

    def __init__(self):
        self.routes, self.log = {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.log.append((path, self.headers.get("Range"), self.headers.get("User-Agent")))
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                if "status" in route:
                    self.send_error(route["status"])
                    return
                if "redirect" in route:
                    self.send_response(302)
                    self.send_header("Location", route["redirect"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, start = route["data"], 0
                rng = self.headers.get("Range")
                if rng and not route.get("ignore_range"):
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "text/html; charset=utf-8" if route.get("html") else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = route.pop("cut_after", None)
                if cut is not None:  # the connection dies half way, once
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def paths(self):
        return [p for p, _, _ in self.log]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("DOWNLOAD_BACKOFF_S", "0.01")
    monkeypatch.setenv("DOWNLOAD_TIMEOUT_S", "10")
    monkeypatch.setenv("WORKERS", "1")


TRUST_ON_FIRST_USE = {"de-en.tgz"}  # IWSLT14's archive: no public checksum of fairseq's copy


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def published(name, data, urls, **kw):
    """A source file whose published size and sha256 are those of `data`."""
    return SourceFile(name, tuple(urls), size=len(data), sha256=sha256(data), reference="https://example.org/sums", **kw)


def ptb_texts():
    return {split: "".join(f" the <unk> company said N {i} {split} \n" for i in range(n)).encode()
            for split, n in (("train", 400), ("valid", 40), ("test", 40))}


def serve_ptb(server, monkeypatch, texts, urls_for=lambda split: ["/ptb/{f}"]):
    """PTB's source table pointed at the local server, with the fixtures' sizes and sha256."""
    for split, data in texts.items():
        name = f"ptb.{split}.txt"
        urls = [server.url + u.format(f=name) for u in urls_for(split)]
        monkeypatch.setitem(S.PTB_TEXT, split, published(name, data, urls))
        server.routes[f"/ptb/{name}"] = {"data": data}


def run_prepare(recipe, tmp_path, monkeypatch, capsys, *argv, setup=None):
    """examples/<recipe>/prepare.py's code path in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    if setup:
        monkeypatch.setenv("SETUP", setup)
    code = 0
    try:
        stages.main(recipe, "prepare", list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err):
    lines = err.strip().splitlines()
    assert lines, "no error line"
    return lines[-1]


# --- the download itself --------------------------------------------------------------------------

def test_first_source_403_second_404_third_used_with_user_agent_and_redirect(server, tmp_path):
    data = os.urandom(300_000)
    server.routes.update({"/forbidden": {"status": 403}, "/moved": {"redirect": "/real"}, "/real": {"data": data}})
    src = published("f.bin", data, [server.url + "/forbidden", server.url + "/missing", server.url + "/moved"])
    dest = str(tmp_path / "orig" / "f.bin")
    record = fetch(src, dest)
    assert open(dest, "rb").read() == data and not os.path.exists(dest + ".part")
    assert server.paths() == ["/forbidden", "/missing", "/moved", "/real"]  # in order, each once (403/404 not retried)
    assert {ua for _, _, ua in server.log} == {USER_AGENT}  # the User-Agent survives the redirect
    assert record["sha256"] == sha256(data) and record["size"] == len(data) and record["origin"].endswith("/moved")


def test_cut_connection_is_resumed_with_range_and_verified(server, tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)
    server.routes["/big"] = {"data": data, "cut_after": 1_500_000}
    src = published("big.tgz", data, [server.url + "/big"])
    dest = str(tmp_path / "big.tgz")
    fetch(src, dest)
    assert open(dest, "rb").read() == data
    (first, r1, _), (second, r2, _) = server.log
    assert r1 is None and r2 == "bytes=1500000-"  # the second request asks for the rest only


def test_part_of_an_earlier_run_is_resumed(server, tmp_path):
    data = os.urandom(200_000)
    server.routes["/f"] = {"data": data}
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:50_000])
    fetch(published("f.bin", data, [server.url + "/f"]), str(dest))
    assert dest.read_bytes() == data and server.log[0][1] == "bytes=50000-"


def test_resumed_part_with_foreign_bytes_is_downloaded_again_from_zero(server, tmp_path):
    data = os.urandom(100_000)
    server.routes["/f"] = {"data": data}
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"x" * 40_000)  # not the start of this file
    fetch(published("f.bin", data, [server.url + "/f"]), str(dest))
    assert dest.read_bytes() == data
    assert [r for _, r, _ in server.log] == ["bytes=40000-", None]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    data = os.urandom(100_000)
    server.routes["/f"] = {"data": data, "ignore_range": True}
    (tmp_path / "f.bin.part").write_bytes(data[:10_000])
    fetch(published("f.bin", data, [server.url + "/f"]), str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data  # a 200 answer to a Range request: rewritten, not appended


def test_wrong_bytes_leave_nothing_under_the_final_name(server, tmp_path):
    data = os.urandom(50_000)
    server.routes["/f"] = {"data": b"y" + data[1:]}  # same size, one byte off
    dest = tmp_path / "f.bin"
    with pytest.raises(RecipeError) as err:
        fetch(published("f.bin", data, [server.url + "/f"]), str(dest))
    message = str(err.value)
    assert "\n" not in message
    assert f"sha256 {sha256(b'y' + data[1:])}, expected {sha256(data)}" in message
    assert f"place it at {dest} (50,000 bytes, sha256 {sha256(data)})" in message
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_html_pages_are_refused(server, tmp_path):
    data = os.urandom(10_000)
    drive = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
             b"<form action=\"https://drive.google.com/uc?export=download&amp;confirm=t\"></form></body></html>")
    server.routes.update({"/drive": {"data": drive, "html": True}, "/login": {"data": b"<html><body>Sign in</body></html>"}})
    dest = tmp_path / "a.tgz"
    with pytest.raises(RecipeError) as err:
        fetch(published("a.tgz", data, [server.url + "/drive", server.url + "/login"]), str(dest))
    message = str(err.value)
    assert f"{server.url}/drive (an HTML page (Google Drive's virus-scan confirmation page) instead of the file)" in message
    assert f"{server.url}/login (an HTML page (a login page) instead of the file)" in message  # no Content-Type needed
    assert not dest.exists() and not (tmp_path / "a.tgz.part").exists()
    assert looks_like_html(b"  <!doctype HTML>") and not looks_like_html(b"\x1f\x8b\x08\x00") and not looks_like_html(b"PK\x03\x04")


def tgz(files):
    """A .tgz holding {path: text}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_trust_on_first_use(server, tmp_path):
    data, other = tgz({"a/x.txt": "one\n"}), tgz({"a/x.txt": "two\n"})
    server.routes["/f"] = {"data": data}
    src = SourceFile("f.tgz", (server.url + "/f",), members=("a/x.txt",))  # no published checksum
    trust = TrustStore(str(tmp_path))
    record = fetch(src, str(tmp_path / "f.tgz"), trust=trust)
    assert trust.get("f.tgz") == sha256(data) and record["verified"] == "trust on first use: sha256 recorded now"
    assert record["trusted_checksum_unauthenticated"] is True  # the local server speaks http://
    assert trust.entry("f.tgz")["unauthenticated"] is True
    os.remove(tmp_path / "f.tgz")
    server.routes["/f"] = {"data": other}  # the source changed its bytes
    with pytest.raises(RecipeError, match=f"sha256 {sha256(other)}, expected {sha256(data)} \\(recorded on first use"):
        fetch(src, str(tmp_path / "f.tgz"), trust=trust)
    assert not (tmp_path / "f.tgz").exists()


# --- through the prepare stage: one line, exit status 2 -------------------------------------------

def test_every_source_failing_prints_one_line_with_each_source_and_exit_2(server, tmp_path, monkeypatch, capsys):
    texts = ptb_texts()
    serve_ptb(server, monkeypatch, texts, urls_for=lambda split: ["/gone/{f}", "/ptb/{f}"])
    server.routes["/ptb/ptb.train.txt"] = {"status": 503}
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys)
    line = one_line_error(err)
    dest = tmp_path / "data" / "orig" / "ptb.train.txt"
    assert code == 2
    assert line.startswith("ptb/prepare: ptb.train.txt: no source delivered it: "), line
    # DOWNLOAD_RETRIES=4 by default: the first attempt and 4 retries
    assert f"{server.url}/gone/ptb.train.txt (HTTP 404); {server.url}/ptb/ptb.train.txt (HTTP 503 after 5 attempts)" in line
    assert f"place it at {dest} ({len(texts['train']):,} bytes, sha256 {sha256(texts['train'])})" in line
    assert line.endswith("or pass it with --archive PATH or a --mirror URL that holds it")  # nothing of that tried yet
    assert server.paths().count("/ptb/ptb.train.txt") == 5  # 503 is retried, 404 is not
    assert not dest.exists()


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_download_retries_counts_retries(server, tmp_path, monkeypatch, retries):
    monkeypatch.setenv("DOWNLOAD_RETRIES", str(retries))
    for status in (503, 425):  # and every other transient error takes the same path
        server.log.clear()
        server.routes["/f"] = {"status": status}
        with pytest.raises(RecipeError, match=f"HTTP {status} after {retries + 1} attempts"):
            fetch(published("f.bin", b"x" * 10, [server.url + "/f"]), str(tmp_path / "f.bin"))
        assert server.paths() == ["/f"] * (retries + 1)  # =1: one retry after the first attempt


def test_a_refused_connection_is_retried(tmp_path, monkeypatch):
    """A network error that is no HTTP status (refused here; DNS failures and resets take the same
    OSError path) is retried like a 503."""
    monkeypatch.setenv("DOWNLOAD_RETRIES", "1")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RecipeError, match=r"f.bin: no source delivered it: http://127.0.0.1:\d+/f \(.*refused.* after 2 attempts\)"):
        fetch(published("f.bin", b"x", [f"http://127.0.0.1:{port}/f"]), str(tmp_path / "f.bin"))


def test_wrong_bytes_through_the_stage_exit_2_nothing_kept(server, tmp_path, monkeypatch, capsys):
    texts = ptb_texts()
    serve_ptb(server, monkeypatch, texts)
    server.routes["/ptb/ptb.valid.txt"] = {"data": texts["valid"][:-5]}  # truncated
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys)
    line = one_line_error(err)
    assert code == 2
    assert (f"ptb.valid.txt: no source delivered it: {server.url}/ptb/ptb.valid.txt (wrong bytes: the server "
            f"announces {len(texts['valid']) - 5:,} bytes, expected {len(texts['valid']):,})") in line, line
    orig = tmp_path / "data" / "orig"
    assert (orig / "ptb.train.txt").exists() and not (orig / "ptb.valid.txt").exists()
    assert not (orig / "ptb.valid.txt.part").exists()


def test_mirror_first_then_provenance_and_no_network_when_placed_by_hand(server, tmp_path, monkeypatch, capsys):
    texts = ptb_texts()
    serve_ptb(server, monkeypatch, texts)
    server.routes.update({f"/lab/ptb.{s}.txt": {"data": d} for s, d in texts.items() if s != "test"})
    code, out, err = run_prepare("ptb", tmp_path, monkeypatch, capsys, "--mirror", server.url + "/lab/")
    assert code == 0, err
    # the mirror's URL/<file> first; test is not on the mirror (404), so the built-in source serves it
    assert server.paths() == ["/lab/ptb.train.txt", "/lab/ptb.valid.txt", "/lab/ptb.test.txt", "/ptb/ptb.test.txt"]
    prepared = tmp_path / "data" / "prepared"
    provenance = json.loads((prepared / "provenance.json").read_text())
    assert provenance["recipe"] == "ptb"
    assert [(f["file"], f["size"], f["sha256"]) for f in provenance["files"]] == [
        (f"ptb.{s}.txt", len(texts[s]), sha256(texts[s])) for s in ("train", "valid", "test")]
    assert provenance["files"][0]["origin"] == f"{server.url}/lab/ptb.train.txt"
    assert provenance["files"][0]["verified"] == "sha256 published by https://example.org/sums"
    assert (prepared / "valid.txt").read_bytes() == texts["valid"]

    # the same files, placed by hand in a fresh data folder: used, nothing requested
    fresh = tmp_path / "fresh"
    (fresh / "data" / "orig").mkdir(parents=True)
    for s, d in texts.items():
        (fresh / "data" / "orig" / f"ptb.{s}.txt").write_bytes(d)
    server.log.clear()
    code, out, err = run_prepare("ptb", fresh, monkeypatch, capsys)
    assert code == 0, err
    assert server.log == []

    # one of them corrupted by hand: refused with one line naming it, its values and what to do
    corrupt = tmp_path / "corrupt"
    (corrupt / "data" / "orig").mkdir(parents=True)
    for s, d in texts.items():
        (corrupt / "data" / "orig" / f"ptb.{s}.txt").write_bytes(d.replace(b"company", b"compary") if s == "test" else d)
    code, out, err = run_prepare("ptb", corrupt, monkeypatch, capsys)
    bad = corrupt / "data" / "orig" / "ptb.test.txt"
    assert code == 2 and server.log == []
    assert one_line_error(err) == (
        f"ptb/prepare: {bad}: sha256 {sha256(texts['test'].replace(b'company', b'compary'))}, expected "
        f"{sha256(texts['test'])}: not ptb.test.txt as published; delete it (the next run downloads it again) or put "
        f"the right file there ({len(texts['test']):,} bytes, sha256 {sha256(texts['test'])})")


def test_archive_is_verified_and_no_verify_records_it(server, tmp_path, monkeypatch, capsys):
    texts = ptb_texts()
    serve_ptb(server, monkeypatch, texts)
    raw = tmp_path / "raw"
    raw.mkdir()
    for s, d in texts.items():
        (raw / f"ptb.{s}.txt").write_bytes(d + (b"extra line\n" if s == "train" else b""))
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys, "--raw-dir", str(raw))
    assert code == 2 and server.log == []
    line = one_line_error(err)
    assert line.startswith(f"ptb/prepare: --raw-dir file {raw / 'ptb.train.txt'}: size {len(texts['train']) + 11:,} "
                           f"bytes, expected {len(texts['train']):,}: this is not ptb.train.txt as published"), line
    assert line.endswith("or add --no-verify to use it anyway (provenance then records it as unverified)")
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys, "--raw-dir", str(raw), "--no-verify")
    assert code == 0, err
    files = json.loads((tmp_path / "data" / "prepared" / "provenance.json").read_text())["files"]
    assert files[0]["verified"] == "no (--no-verify)" and files[0]["sha256"] == sha256(texts["train"] + b"extra line\n")


def test_only_mirrors_never_touches_the_built_in_sources(server, tmp_path, monkeypatch, capsys):
    texts = ptb_texts()
    serve_ptb(server, monkeypatch, texts)
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys, "--mirror", server.url + "/empty", "--only-mirrors")
    assert code == 2 and server.paths() == ["/empty/ptb.train.txt"]
    line = one_line_error(err)
    assert line.startswith(f"ptb/prepare: ptb.train.txt: no source delivered it: {server.url}/empty/ptb.train.txt (HTTP 404).")
    # the advice fits what was tried: no "pass --mirror" to someone who passed --mirror --only-mirrors
    assert line.endswith("pass it with --archive PATH, or leave out --only-mirrors to try its built-in sources too"), line
    server.routes["/ptb/ptb.train.txt"] = {"status": 404}
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys, "--mirror", server.url + "/empty")
    assert one_line_error(err).endswith("pass it with --archive PATH, or another --mirror URL that holds it")


def test_archive_for_one_file_and_the_mirror_for_the_others(server, tmp_path, monkeypatch, capsys):
    texts = ptb_texts()
    serve_ptb(server, monkeypatch, texts)
    server.routes.update({f"/lab/ptb.{s}.txt": {"data": d} for s, d in texts.items()})
    given = tmp_path / "ptb.test.txt"
    given.write_bytes(texts["test"])
    code, _, err = run_prepare("ptb", tmp_path, monkeypatch, capsys, "--archive", str(given), "--mirror",
                               server.url + "/lab", "--only-mirrors")
    assert code == 0, err
    assert server.paths() == ["/lab/ptb.train.txt", "/lab/ptb.valid.txt"]  # the test file came by hand
    files = json.loads((tmp_path / "data" / "prepared" / "provenance.json").read_text())["files"]
    assert [f["origin"] for f in files] == [f"{server.url}/lab/ptb.train.txt", f"{server.url}/lab/ptb.valid.txt",
                                            str(given)]
    # --raw-dir holding one file: the others are downloaded from the built-in sources
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ptb.valid.txt").write_bytes(texts["valid"])
    server.log.clear()
    fresh = tmp_path / "fresh"
    code, _, err = run_prepare("ptb", fresh, monkeypatch, capsys, "--raw-dir", str(raw))
    assert code == 0, err
    assert server.paths() == ["/ptb/ptb.train.txt", "/ptb/ptb.test.txt"]


def test_archive_and_mirror_through_the_script(server, tmp_path):
    """examples/ptb/prepare.py --archive ptb.test.txt --mirror URL: the other two from the mirror
    (--no-verify: the fixtures are not the published files, and the script's tables are not patched)."""
    texts = ptb_texts()
    server.routes.update({f"/lab/ptb.{s}.txt": {"data": d} for s, d in texts.items()})
    given = tmp_path / "ptb.test.txt"
    given.write_bytes(texts["test"])
    proc = run_all({"ptb": dict(argv=[sys.executable, os.path.join(REPO, "examples", "ptb", "prepare.py"), "--archive",
                                      str(given), "--mirror", server.url + "/lab", "--only-mirrors", "--no-verify"],
                                env={**ENV, "DATA_DIR": str(tmp_path / "data")})})["ptb"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert server.paths() == ["/lab/ptb.train.txt", "/lab/ptb.valid.txt"]
    prepared = tmp_path / "data" / "prepared"
    assert [(prepared / f"{s}.txt").read_bytes() for s in ("train", "valid", "test")] == [texts[s] for s in
                                                                                        ("train", "valid", "test")]


def test_https_comes_first_wherever_a_host_serves_both():
    for files in S.DOWNLOADS.values():
        for f in files + (S.PTB_SIMPLE_EXAMPLES,):
            for i, url in enumerate(f.urls):
                if url.startswith("http://") and "https://" + url[len("http://"):] in f.urls:
                    assert f.urls.index("https://" + url[len("http://"):]) < i, f.urls
    assert S.IWSLT14_DE_EN.urls[0].startswith("https://")  # the one file trusted on first use


# --- trust on first use only for bytes that prove what they are -------------------------------------

IWSLT_MEMBERS = {m: "<doc>\n<seg id=\"1\"> x </seg>\n</doc>\n" for m in S.IWSLT14_DE_EN.members}


def refused_through_the_script(server, tmp_path, cases, *extra):
    """examples/iwslt14/prepare.py --mirror <server>/<case> --only-mirrors, one fresh DATA_DIR per
    case, run side by side: {case: (CompletedProcess, orig folder)}."""
    jobs = {}
    for case, data in cases.items():
        server.routes[f"/{case}/de-en.tgz"] = {"data": data}
        env = {**ENV, "DATA_DIR": str(tmp_path / case), "DOWNLOAD_BACKOFF_S": "0.01"}
        jobs[case] = dict(argv=[sys.executable, os.path.join(REPO, "examples", "iwslt14", "prepare.py"), "--mirror",
                                f"{server.url}/{case}", "--only-mirrors", *extra], env=env)
    return {case: (proc, tmp_path / case / "orig") for case, proc in run_all(jobs).items()}


def test_garbage_under_a_first_use_name_is_refused_and_nothing_recorded(server, tmp_path):
    good = tgz(IWSLT_MEMBERS)
    lacking = tgz({m: t for m, t in IWSLT_MEMBERS.items() if not m.endswith("tst2012.de-en.en.xml")})
    results = refused_through_the_script(server, tmp_path, {
        "random": os.urandom(4096), "truncated": good[: len(good) // 2], "lacking": lacking})
    for case, why in (("random", "not a gzip-compressed tar archive: Not a gzipped file"),
                      ("truncated", "not a gzip-compressed tar archive: Compressed file ended before the end-of-stream "
                                    "marker was reached"),
                      ("lacking", "a gzip-compressed tar archive without de-en/IWSLT14.TED.tst2012.de-en.en.xml")):
        proc, orig = results[case]
        assert proc.returncode == 2, (case, proc.stderr[-2000:])
        line = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert line.startswith(f"iwslt14/prepare: de-en.tgz: no source delivered it: {server.url}/{case}/de-en.tgz "
                               f"(wrong bytes: {why}"), (case, line)
        assert line.endswith("pass it with --archive PATH, or leave out --only-mirrors to try its built-in sources "
                             "too"), line
        assert not (orig / "de-en.tgz").exists() and not (orig / "de-en.tgz.part").exists()
        assert not (orig / "trusted-checksums.json").exists()


def test_the_next_source_is_tried_after_garbage_and_the_good_copy_trusted(server, tmp_path):
    good = tgz(IWSLT_MEMBERS)
    server.routes.update({"/bad/a.tgz": {"data": os.urandom(4096)}, "/good/a.tgz": {"data": good}})
    src = SourceFile("a.tgz", (), members=tuple(IWSLT_MEMBERS))
    trust = TrustStore(str(tmp_path))
    record = fetch(src, str(tmp_path / "a.tgz"), mirrors=[server.url + "/bad", server.url + "/good"], trust=trust)
    assert record["origin"] == f"{server.url}/good/a.tgz" and trust.get("a.tgz") == sha256(good)


def test_a_given_archive_that_is_garbage_is_refused_and_a_damaged_one_is_one_line(server, tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "de-en.tgz"
    garbage.write_bytes(os.urandom(4096))
    code, _, err = run_prepare("iwslt14", tmp_path, monkeypatch, capsys, "--archive", str(garbage))
    assert code == 2 and server.log == []
    assert one_line_error(err).startswith(f"iwslt14/prepare: --archive {garbage}: not a gzip-compressed tar archive: ")
    assert not (tmp_path / "data" / "orig" / "trusted-checksums.json").exists()
    # with --no-verify nothing is checked before use: extraction stops with one line, no traceback
    code, _, err = run_prepare("iwslt14", tmp_path, monkeypatch, capsys, "--archive", str(garbage), "--no-verify")
    line = one_line_error(err)
    assert code == 2 and "Traceback" not in err
    assert line.startswith(f"iwslt14/prepare: {tmp_path / 'data' / 'orig' / 'de-en.tgz'} (a link to {garbage}): "
                           "cannot be unpacked (")
    assert line.endswith("the file is damaged or not de-en.tgz; delete it (the next run downloads it again) or pass a "
                         "good copy with --archive PATH")

def test_list_sources_json_of_every_recipe(tmp_path, monkeypatch, capsys):
    for (recipe, setup), files in S.DOWNLOADS.items():
        code, out, err = run_prepare(recipe, tmp_path, monkeypatch, capsys, "--list-sources", "--json", setup=setup)
        assert code == 0, err
        entries = json.loads(out)
        assert [e["file"] for e in entries] == [f.name for f in files]
        for e in entries:
            assert e["urls"] and all(u.startswith(("http://", "https://")) for u in e["urls"])
            if e["file"] in TRUST_ON_FIRST_USE:  # no public checksum exists: said so
                assert e["verification"] == "trust on first use (no published checksum)" and e["size"] is None
                assert not any(k in e for k in ("sha256", "sha1", "md5"))
            else:
                assert any(k in e for k in ("sha256", "sha1", "md5")), e
                assert e["checksum_reference"].startswith("https://github.com/")
        code, out, err = run_prepare(recipe, tmp_path, monkeypatch, capsys, "--list-sources", setup=setup)
        assert code == 0 and all(f.name in out for f in files)
    # no first source is one that public reports say is dead
    firsts = [f.urls[0] for files in S.DOWNLOADS.values() for f in files]
    assert not [u for u in firsts if "research.metamind.io" in u or "drive.google" in u or "wit3.fbk.eu" in u]


def test_list_sources_json_shows_the_sha256_recorded_on_first_use(tmp_path, monkeypatch, capsys):
    TrustStore(str(tmp_path / "data" / "orig")).record("de-en.tgz", "ab" * 32, 1234, "http://example.org/de-en.tgz")
    code, out, _ = run_prepare("iwslt14", tmp_path, monkeypatch, capsys, "--list-sources", "--json")
    (entry,) = json.loads(out)
    assert code == 0 and entry["sha256"] == "ab" * 32 and entry["size"] == 1234
    assert entry["checksum_reference"].startswith("recorded on first use (")
    assert entry["trusted_checksum_unauthenticated"] is True  # it came over http://
    code, out, _ = run_prepare("iwslt14", tmp_path, monkeypatch, capsys, "--list-sources")
    first = out.splitlines()[2].split()
    assert first == ["de-en.tgz", "1,234", "sha256", "ab" * 32]


def test_list_sources_json_through_the_script(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "wmt14_en_de", "prepare.py"), "--list-sources",
                           "--json"], capture_output=True, text=True, env={**os.environ, "SETUP": "scaling_nmt",
                                                                            "DATA_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert [e["file"] for e in json.loads(proc.stdout)] == ["europarl-v7-de-en.tgz", "training-parallel-commoncrawl.tgz",
                                                            "training-parallel-nc-v11.tgz", "dev.tgz"]


# --- WMT16 for scaling_nmt, rebuilt from the statmt archives ----------------------------------

def wmt16_fixtures(seed=40):
    """Europarl v7 de-en.tgz, Common Crawl, News Commentary v11 and WMT16's dev.tgz in their real
    layouts (the files google/seq2seq's wmt16_en_de.sh reads)."""
    archives = {}
    for k, (name, stem) in enumerate((("europarl-v7-de-en.tgz", "europarl-v7.de-en"),
                                      ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
                                      ("training-parallel-nc-v11.tgz", "training-parallel-nc-v11/news-commentary-v11.de-en"))):
        pairs = sentence_pairs(120, seed=seed + k)
        if k == 0:
            pairs[0] = ("Ein " + "sehr " * 90 + "langer Satz", "A long sentence")  # > 80 words: cleaned away
        archives[name] = {f"{stem}.de": "".join(p[0] + "\n" for p in pairs), f"{stem}.en": "".join(p[1] + "\n" for p in pairs)}
    n13, n14 = sentence_pairs(7, seed=60), sentence_pairs(9, seed=61)
    archives["dev.tgz"] = {
        "dev/newstest2013.de": "".join(p[0] + "\n" for p in n13), "dev/newstest2013.en": "".join(p[1] + "\n" for p in n13),
        "dev/newstest2014-deen-src.de.sgm": seg_file([p[0] for p in n14], "srcset", "de").replace(
            '<seg id="2"> ', '<seg id="2">\n   '),  # a segment spread over two lines, as input-from-sgm.perl allows
        "dev/newstest2014-deen-ref.en.sgm": seg_file([p[1] for p in n14], "refset", "en")}
    return {name: tgz(files) for name, files in archives.items()}, n13, n14


def test_wmt16_scaling_nmt_rebuilt_from_statmt_archives(server, tmp_path, monkeypatch, capsys):
    blobs, n13, n14 = wmt16_fixtures()
    for attr, name in (("EUROPARL_V7_DE_EN", "europarl-v7-de-en.tgz"), ("COMMONCRAWL", "training-parallel-commoncrawl.tgz"),
                       ("NEWS_COMMENTARY_V11", "training-parallel-nc-v11.tgz"), ("WMT16_DEV", "dev.tgz")):
        server.routes[f"/statmt/{name}"] = {"data": blobs[name]}
        if name == "dev.tgz":  # no published checksum: trust on first use
            monkeypatch.setattr(S, attr, SourceFile(name, (f"{server.url}/statmt/{name}",)))
        else:
            monkeypatch.setattr(S, attr, published(name, blobs[name], [f"{server.url}/statmt/{name}"]))
    monkeypatch.setitem(S.DOWNLOADS, ("wmt14_en_de", "scaling_nmt"), ())
    from gpam_fairseq.recipes import preparation

    monkeypatch.setattr(preparation, "rebuild_wmt16_en_de",
                        lambda d, s, bpe_tokens=32000, _f=preparation.rebuild_wmt16_en_de: _f(d, s, bpe_tokens=300))
    code, out, err = run_prepare("wmt14_en_de", tmp_path, monkeypatch, capsys, setup="scaling_nmt")
    assert code == 0, err[-3000:]
    prep = tmp_path / "data" / "prepared"
    read = lambda p: p.read_text(encoding="utf-8").splitlines()  # noqa: E731
    # train: 3 x 120 pairs, the one over 80 words cleaned away; Moses-tokenised (escaped), BPE'd
    assert len(read(prep / "train.en")) == len(read(prep / "train.de")) == 359
    assert len(read(prep / "valid.de")) == 7 and len(read(prep / "test.en")) == 9
    assert read(prep / "test.raw.en") == [p[1] for p in n14] and read(prep / "test.raw.de") == [p[0] for p in n14]
    test_en = " ".join(read(prep / "test.en")).replace("@@ ", "")
    assert "&apos;s" in test_en and " , right ?" in test_en  # tokenizer.perl's escaping and splitting, no -a
    assert read(prep / "valid.en")[0].replace("@@ ", "").startswith(n13[0][1].split(" ")[0])
    assert read(prep / "code")[0].startswith("#version")
    provenance = json.loads((prep / "provenance.json").read_text())
    assert [f["file"] for f in provenance["files"]] == list(blobs)
    assert provenance["files"][3]["verified"] == "trust on first use: sha256 recorded now"
    assert json.loads((tmp_path / "data" / "orig" / "trusted-checksums.json").read_text())["dev.tgz"]["sha256"] == \
        sha256(blobs["dev.tgz"])
