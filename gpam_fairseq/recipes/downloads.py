"""Getting a recipe's source files: from several sources, resumed, checked byte for byte.

A :class:`SourceFile` names one file a recipe needs: its local name, where it can be
downloaded (the current canonical location first, then mirrors), its size and a checksum
published by a public reference (sha256, or the sha1/md5 the reference publishes). Where no
public checksum exists the file is verified by *trust on first use*: the first copy seen has
its sha256 recorded in the data folder (``orig/trusted-checksums.json``), and every later
use, downloaded or placed by hand, must match it. Only bytes that prove what they are get
trusted: an archive must open as the format its name says (the whole gzip stream decompresses,
the tar or zip lists its entries) and list the ``members`` the recipe reads
(:func:`archive_problem`); otherwise it is refused like wrong bytes, nothing is recorded, and
the next source is tried. The record says whether the trusted copy came over an
unauthenticated connection (http://, ftp://).

:func:`fetch` downloads into ``<name>.part`` with HTTP Range resumption, retries with
exponential backoff and timeouts, a User-Agent, followed redirects, refuses an HTML page served
in place of the file (Google Drive's virus-scan confirmation page, a login or error page), shows
progress through tqdm, and moves the file to its final name only once its size and checksum
match. ``DOWNLOAD_RETRIES`` (default 4) counts the retries of one source after its first attempt;
only transient errors are retried: HTTP 408, 425, 429 and 5xx, timeouts, the network's errors
(``OSError``: a DNS failure, a refused or reset connection, a connection closed before the
announced length) and malformed HTTP responses (``http.client.HTTPException``, ``ValueError``). Every failure ends in one :class:`RecipeError` line: the file, each source tried with
its HTTP status or error, and what to do next, fitted to what was tried (placing the file by
hand with its checksum, ``--archive``, ``--mirror``, or leaving out ``--only-mirrors``).
"""

import hashlib
import http.client
import json
import os
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

from gpam_fairseq.recipes.common import RecipeError, env, env_int, say

# Some hosts answer Python's default agent ("Python-urllib/3.x") with 403 (wikitext.smerity.com
# does, as public reports say); a browser-compatible agent that still names us.
USER_AGENT = "Mozilla/5.0 (compatible; gpam_fairseq-recipes/0.1)"
TRUST_FILE = "trusted-checksums.json"
BLOCK = 1 << 20
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<!--", b"<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!doctype html")


@dataclass(frozen=True)
class SourceFile:
    """One file a recipe needs, where to get it, and what its bytes must be."""

    name: str  # the local file name (under <data>/orig/; --archive and --mirror URL/<name> use it)
    urls: Tuple[str, ...]  # the current canonical source first, then mirrors
    size: Optional[int] = None  # bytes, from the reference
    sha256: Optional[str] = None
    sha1: Optional[str] = None
    md5: Optional[str] = None
    reference: str = ""  # public address of the size and checksum; "" = none published (trust on first use)
    aliases: Tuple[str, ...] = field(default=())  # other names the same file goes by (e.g. the URL's)
    # entries the recipe reads from this archive ("dir/file"; a bare "file" may lie in any folder):
    # a first copy without a published checksum is trusted only if it lists them
    members: Tuple[str, ...] = field(default=())

    @property
    def checksum(self):
        """(algorithm, value) of the published checksum, or None (trust on first use)."""
        for algo in ("sha256", "sha1", "md5"):
            if getattr(self, algo):
                return algo, getattr(self, algo)
        return None

    def names(self):
        return (self.name, *self.aliases, *(os.path.basename(u.split("?")[0]) for u in self.urls))

    def as_json(self, trust=None):
        """{file, size, sha256|sha1|md5, urls, ...}; without a published checksum, the sha256 and
        size recorded on first use in `trust` (a TrustStore), where there is one."""
        entry = {"file": self.name, "size": self.size, "urls": list(self.urls)}
        for algo in ("sha256", "sha1", "md5"):
            if getattr(self, algo):
                entry[algo] = getattr(self, algo)
        entry["checksum_reference"] = self.reference or None
        if not self.checksum:
            entry["verification"] = "trust on first use (no published checksum)"
            recorded = trust.entry(self.name) if trust is not None else None
            if recorded:
                entry.update(size=recorded["size"], sha256=recorded["sha256"],
                             checksum_reference=f"recorded on first use ({recorded['first_seen']}) in {trust.path}",
                             trusted_checksum_origin=recorded.get("origin"),
                             trusted_checksum_unauthenticated=unauthenticated(recorded.get("origin") or ""))
        return entry


# --- hashing and verification ---------------------------------------------------------------

def file_digests(path, algos=("sha256",)):
    """{algorithm: hex digest} of a file, read once."""
    hashes = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _fmt_size(n):
    return "unknown" if n is None else f"{n:,} bytes"


def expected_text(src: SourceFile, trusted=None):
    """'190,229,076 bytes, sha256 242b...' for messages."""
    parts = [_fmt_size(src.size)] if src.size is not None else []
    if src.checksum:
        parts.append(f"{src.checksum[0]} {src.checksum[1]}")
    elif trusted:
        parts.append(f"sha256 {trusted} (recorded on first use)")
    else:
        parts.append("no published checksum")
    return ", ".join(parts)


ARCHIVE_FORMATS = ((".tar.gz", "a gzip-compressed tar archive"), (".tgz", "a gzip-compressed tar archive"),
                   (".tar", "a tar archive"), (".zip", "a zip archive"))


def archive_format(name):
    """What a file of this name must be ("a zip archive", ...), or None for other files."""
    return next((what for suffix, what in ARCHIVE_FORMATS if name.endswith(suffix)), None)


def _one_line(err):
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def archive_entries(path, name):
    """The entry names of the archive at `path` (its format from `name`), having read all of it:
    the whole gzip stream of a .tgz (its length and CRC checked), each zip entry's CRC.
    Raises ValueError saying what is wrong."""
    what = archive_format(name)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    raise ValueError(f"its entry {bad} fails its CRC check")
                return z.namelist()
        if name.endswith((".tgz", ".tar.gz")):
            import gzip

            with gzip.open(path, "rb") as f:
                while f.read(BLOCK):
                    pass
        with tarfile.open(path) as t:
            return t.getnames()
    except ValueError:
        raise
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"not {what}: {_one_line(e)}") from None


def archive_problem(path, src: SourceFile):
    """Why `path` is not the archive `src` names (not that format, unreadable, or lacking one of
    src.members), or None. Files that are not archives have none."""
    if archive_format(src.name) is None:
        return None
    try:
        entries = archive_entries(path, src.name)
    except ValueError as e:
        return str(e)
    names = {e[2:] if e.startswith("./") else e for e in entries}
    missing = [m for m in src.members if m not in names and not any(n.endswith("/" + m) for n in names)]
    if missing:
        more = f" and {len(missing) - 1} more of the {len(src.members)} the recipe reads" if len(missing) > 1 else ""
        return f"{archive_format(src.name)} without {missing[0]}{more}"
    return None


def unauthenticated(origin):
    """True for a download over a connection that does not authenticate the server (http://,
    ftp://), False for https://, None for a local file."""
    if origin.startswith("https://"):
        return False
    if origin.startswith(("http://", "ftp://")):
        return True
    return None


class TrustStore:
    """sha256 of files without a published checksum, recorded the first time each is used."""

    def __init__(self, folder):
        self.path = os.path.join(folder, TRUST_FILE)

    def _load(self):
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def entry(self, name):
        return self._load().get(name)

    def get(self, name):
        entry = self.entry(name)
        return entry and entry["sha256"]

    def record(self, name, sha256, size, origin):
        data = self._load()
        data[name] = {"sha256": sha256, "size": size, "first_seen": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "origin": origin, "unauthenticated": unauthenticated(origin)}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


class Mismatch(Exception):
    """The bytes are not the expected ones: the message says what differs."""


def check_file(path, src: SourceFile, trust: Optional[TrustStore], origin: str):
    """Size and checksum of `path` against `src` (or the trusted first-use sha256). Returns the
    provenance record; raises Mismatch naming expected and actual values."""
    size = os.path.getsize(path)
    if src.size is not None and size != src.size:
        raise Mismatch(f"size {size:,} bytes, expected {src.size:,}")
    algos = ["sha256"] + ([src.checksum[0]] if src.checksum and src.checksum[0] != "sha256" else [])
    digests = file_digests(path, algos)
    record = {"file": src.name, "size": size, "sha256": digests["sha256"], "origin": origin}
    if src.checksum:
        algo, want = src.checksum
        if digests[algo] != want.lower():
            raise Mismatch(f"{algo} {digests[algo]}, expected {want}")
        record["verified"] = f"{algo} published by {src.reference}"
        if algo != "sha256":
            record[algo] = digests[algo]
    elif trust is not None:
        trusted = trust.get(src.name)
        if trusted is not None and trusted != digests["sha256"]:
            raise Mismatch(f"sha256 {digests['sha256']}, expected {trusted} (recorded on first use in {trust.path})")
        if trusted is None:
            problem = archive_problem(path, src)  # nothing is trusted that is not the archive it must be
            if problem:
                raise Mismatch(problem)
            trust.record(src.name, digests["sha256"], size, origin)
            say(f"  {src.name}: no published checksum; trust on first use: recorded sha256 {digests['sha256']} "
                f"in {trust.path}" + (" (from an unauthenticated http connection)" if unauthenticated(origin) else ""))
            record["verified"] = "trust on first use: sha256 recorded now"
        else:
            record["verified"] = f"trust on first use: sha256 recorded earlier in {trust.path}"
        first = trust.entry(src.name)
        record["trusted_checksum_origin"] = first.get("origin")
        record["trusted_checksum_unauthenticated"] = unauthenticated(first.get("origin") or "")
    return record


# --- HTTP ---------------------------------------------------------------------------------------

class HTMLInsteadOfFile(Exception):
    pass


class WrongLength(Exception):
    """The server announces another length than the file's published size: not the file."""


class _PermanentHTTPError(Exception):
    """An HTTP status no retry will change (403, 404, ...)."""


def looks_like_html(first_bytes: bytes, content_type: str = "") -> bool:
    """An HTML page (a login, error or Drive confirmation page) rather than an archive or text file."""
    if "text/html" in (content_type or "").lower():
        return True
    head = first_bytes[:512].lstrip().lower()
    return head.startswith(_HTML_STARTS) or (head.startswith(b"<") and b"<html" in head)


def _html_reason(url, first_bytes):
    text = first_bytes[:4096].lower()
    if b"drive.google" in text or "drive.google" in url or "docs.google" in url or b"confirm=" in text:
        return "an HTML page (Google Drive's virus-scan confirmation page) instead of the file"
    if b"login" in text or b"sign in" in text or b"password" in text:
        return "an HTML page (a login page) instead of the file"
    return "an HTML page instead of the file"


def _open(url, start, timeout):
    headers = {"User-Agent": env("DOWNLOAD_USER_AGENT", USER_AGENT), "Accept": "*/*"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url, part, expected_size, timeout, show_progress):
    """One attempt: GET url (Range from the .part's length), append to the .part."""
    start = os.path.getsize(part) if os.path.exists(part) else 0
    if expected_size is not None and start >= expected_size:
        if start == expected_size:
            return  # a complete .part from an earlier run; verified by the caller
        os.remove(part)  # longer than the file can be: start over
        start = 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the server has no bytes past the .part: take it as complete
            return
        if e.code in (408, 425, 429) or e.code >= 500:  # the statuses docs/reproducing.md lists as retried
            raise OSError(f"HTTP {e.code}") from None
        raise _PermanentHTTPError(f"HTTP {e.code}") from None
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if (start and status == 206) else "wb"
        done = start if mode == "ab" else 0
        total = resp.headers.get("Content-Length")
        total = (int(total) + done) if total and total.isdigit() else expected_size
        first = resp.read(min(BLOCK, 64 * 1024))
        if done == 0 and looks_like_html(first, resp.headers.get("Content-Type", "")):
            raise HTMLInsteadOfFile(_html_reason(resp.geturl(), first))
        if mode == "wb" and expected_size is not None and total != expected_size:  # refused before any byte is saved
            raise WrongLength(f"the server announces {total:,} bytes, expected {expected_size:,}")
        from tqdm import tqdm

        with open(part, mode) as out, tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"  {os.path.basename(part)[:-5]}", disable=not show_progress,
                                           mininterval=1.0, file=sys.stderr, leave=False) as bar:
            block = first
            while block:
                out.write(block)
                bar.update(len(block))
                done += len(block)
                block = resp.read(BLOCK)
        if total is not None and done < total:  # the server closed early: resume on the next attempt
            raise OSError(f"connection closed after {done:,} of {total:,} bytes")


def _describe(err):
    if isinstance(err, socket.timeout) or "timed out" in str(err):
        return "timed out"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    if isinstance(err, http.client.IncompleteRead):
        return f"connection cut after {len(err.partial):,} more bytes"
    return str(err) or type(err).__name__


def fetch(src: SourceFile, dest: str, mirrors=(), trust: Optional[TrustStore] = None, builtin=True):
    """Download `src` to `dest` (via dest.part), trying mirrors' URL/<name> first, then src.urls
    (unless builtin=False: the mirrors only).
    Returns the provenance record of the verified file. Nothing is left under `dest` unless its
    bytes are right; a .part of a source that failed half way stays for the next run to resume."""
    urls = [m.rstrip("/") + "/" + src.name for m in mirrors] + (list(src.urls) if builtin else [])
    if not urls:
        raise RecipeError(f"{src.name}: no source to download it from; place it at {dest} ({expected_text(src)})")
    attempts = 1 + max(0, env_int("DOWNLOAD_RETRIES", 4))  # the first attempt, then the retries
    backoff = float(env("DOWNLOAD_BACKOFF_S", 2.0))
    timeout = float(env("DOWNLOAD_TIMEOUT_S", 60.0))
    show_progress = sys.stderr.isatty() and env("DOWNLOAD_PROGRESS", "1") != "0"
    part = dest + ".part"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    failures = []
    for url in urls:
        say(f"  downloading {src.name} from {url}")
        error = None
        fresh_retry_done = resumed = False
        attempt = 0
        while attempt < attempts:
            attempt += 1
            resumed = resumed or (os.path.exists(part) and os.path.getsize(part) > 0)
            try:
                _transfer(url, part, src.size, timeout, show_progress)
            except _PermanentHTTPError as e:
                error = str(e)
                break
            except WrongLength as e:
                if os.path.exists(part):
                    os.remove(part)
                error = f"wrong bytes: {e}"
                break
            except HTMLInsteadOfFile as e:
                if os.path.exists(part):
                    os.remove(part)
                error = str(e)
                break
            except (OSError, http.client.HTTPException, ValueError) as e:
                error = _describe(e)
                if attempt < attempts:
                    wait = backoff * 2 ** (attempt - 1)
                    say(f"  {src.name}: {error}; retrying in {wait:g} s (retry {attempt} of {attempts - 1})")
                    time.sleep(wait)
                else:
                    error += f" after {attempts} attempts"
                continue
            try:
                record = check_file(part, src, trust, url)
            except Mismatch as e:
                os.remove(part)  # wrong bytes are never kept, not even for resuming
                if resumed and not fresh_retry_done:  # a resumed .part may hold another copy's bytes: once more from 0
                    fresh_retry_done, resumed, attempt = True, False, attempt - 1
                    say(f"  {src.name}: {e} after resuming; downloading again from the start")
                    continue
                error = f"wrong bytes: {e}"
                break
            os.replace(part, dest)
            return record
        failures.append(f"{url} ({error})")
    kept = f"; the partial download {part} is kept for resuming" if os.path.exists(part) else ""
    raise RecipeError(
        f"{src.name}: no source delivered it: " + "; ".join(failures) + f"{kept}. Download it by hand and place it "
        f"at {dest} ({expected_text(src, trust.get(src.name) if trust else None)}), {_other_ways(src, mirrors, builtin)}")


def _other_ways(src: SourceFile, mirrors, builtin):
    """The rest of the advice of the all-sources-failed line: what the user has not tried yet."""
    if mirrors and not builtin and src.urls:
        return "pass it with --archive PATH, or leave out --only-mirrors to try its built-in sources too"
    if mirrors:
        return "pass it with --archive PATH, or another --mirror URL that holds it"
    return "or pass it with --archive PATH or a --mirror URL that holds it"
