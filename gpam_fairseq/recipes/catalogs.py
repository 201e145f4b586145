"""gettext translation catalogs (.po and .mo) as sentence pairs: the `--catalogs` input of the
own_corpus recipe.

A catalog holds the source strings of one program (``msgid``, by gettext's convention in
English) with their human translations into one language (``msgstr``). Read here without
gettext's runtime: every translated entry becomes one (msgid, msgstr) pair; a plural entry gives
two pairs (singular with the first form, plural with the second); fuzzy, obsolete and
untranslated entries and the header are left out; a message context (``msgctxt``) is dropped
from the text. The catalog's language comes from its header (``Language: fr``), else from its
path (``fr/LC_MESSAGES/x.mo``, ``po/fr.po``).
"""

import os
import re
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from gpam_fairseq.recipes.common import RecipeError

CATALOG_SUFFIXES = (".po", ".mo")
_MO_MAGIC = {b"\xde\x12\x04\x95": "<", b"\x95\x04\x12\xde": ">"}


@dataclass
class Catalog:
    path: str
    language: Optional[str]
    pairs: List[Tuple[str, str]] = field(default_factory=list)
    entries: int = 0  # entries with a msgid, header excluded, translated or not


def base_language(code: Optional[str]) -> Optional[str]:
    """fr_CA, fr-FR, sr@latin -> fr, fr, sr (lowercased); None stays None."""
    if not code:
        return None
    return re.split(r"[_@.\-]", code.strip().lower(), maxsplit=1)[0] or None


def find_catalogs(paths) -> List[str]:
    """The .po/.mo files among paths, folders searched recursively, sorted within each folder."""
    found = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.endswith(CATALOG_SUFFIXES)]
        elif os.path.isfile(p):
            if not p.endswith(CATALOG_SUFFIXES):
                raise RecipeError(f"--catalogs {p}: not a .po or .mo file")
            found.append(p)
        else:
            raise RecipeError(f"--catalogs {p}: no such file or folder")
    return found


def _charset(header: str) -> str:
    m = re.search(r"charset=([A-Za-z0-9_\-.:]+)", header)
    return m.group(1) if m and m.group(1).upper() != "CHARSET" else "utf-8"


def _language(header: str, path: str) -> Optional[str]:
    m = re.search(r"^Language:[ \t]*([A-Za-z@_\-.]+)", header, re.M)
    if m:
        return m.group(1)
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "LC_MESSAGES":
        return parts[-3]
    stem = os.path.splitext(parts[-1])[0]
    return stem if re.fullmatch(r"[a-z]{2,3}([_@][A-Za-z]+)?", stem) else None


def _decode(raw: bytes, charset: str, path: str, where: str) -> str:
    try:
        return raw.decode(charset)
    except LookupError:
        raise RecipeError(f"{path}: unknown charset {charset!r} in its header") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: {where} is not valid {charset} (byte {e.start}): the catalog's "
                          f"Content-Type header names the wrong charset, or the file is damaged") from None


def _add(catalog: Catalog, msgid: str, msgid_plural: Optional[str], msgstrs: List[str]):
    catalog.entries += 1
    if msgid_plural is None:
        if msgstrs and msgstrs[0]:
            catalog.pairs.append((msgid, msgstrs[0]))
        return
    for source, target in zip((msgid, msgid_plural), msgstrs):
        if target:
            catalog.pairs.append((source, target))


def read_mo(path: str) -> Catalog:
    with open(path, "rb") as f:
        data = f.read()
    order = _MO_MAGIC.get(data[:4])
    if order is None:
        raise RecipeError(f"{path}: not a .mo catalog (bad magic number)")
    try:
        _, n, originals, translations = struct.unpack(order + "4I", data[4:20])
        table = [(struct.unpack(order + "2I", data[originals + 8 * i:originals + 8 * i + 8]),
                  struct.unpack(order + "2I", data[translations + 8 * i:translations + 8 * i + 8])) for i in range(n)]
    except struct.error:
        raise RecipeError(f"{path}: truncated .mo catalog") from None
    raw = [(data[o:o + lo], data[t:t + lt]) for (lo, o), (lt, t) in table]
    if any(o + lo > len(data) or t + lt > len(data) for (lo, o), (lt, t) in table):
        raise RecipeError(f"{path}: truncated .mo catalog")
    header = next((t.decode("utf-8", "replace") for m, t in raw if m == b""), "")
    charset = _charset(header)
    catalog = Catalog(path, _language(header, path))
    for i, (m, t) in enumerate(raw):
        if m == b"":
            continue
        msgid = _decode(m, charset, path, f"message {i}")
        msgstr = _decode(t, charset, path, f"translation {i}")
        msgid = msgid.split("\x04", 1)[-1]  # msgctxt EOT msgid
        singular, _, plural = msgid.partition("\x00")
        _add(catalog, singular, plural if _ else None, msgstr.split("\x00"))
    return catalog


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _po_string(text: str, path: str, lineno: int) -> str:
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise RecipeError(f"{path}:{lineno}: expected a quoted string, got {text[:40]!r}")
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            m = re.match(r"[0-7]{1,3}", body[i + 1:])
            if m:
                out.append(chr(int(m.group(0), 8)))
                i += 1 + len(m.group(0))
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def read_po(path: str) -> Catalog:
    with open(path, "rb") as f:
        raw = f.read()
    head = raw[:4096].decode("latin-1")
    text = _decode(raw, _charset(head), path, "the file")
    entries, current, key, fuzzy = [], None, None, False

    def close():
        nonlocal current, fuzzy
        if current is not None and "msgid" in current and not current.get("fuzzy"):
            entries.append(current)
        current, fuzzy = None, False

    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            close()
            continue
        if s.startswith("#~"):  # obsolete entry
            close()
            continue
        if s.startswith("#"):
            if current is not None and "msgstr" in current:
                close()
            if s.startswith("#,") and "fuzzy" in s:
                fuzzy = True
            continue
        m = re.match(r"(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(.*)$", s)
        if m:
            word = m.group(1)
            if word in ("msgctxt", "msgid") and current is not None and "msgstr" in current:
                close()
            if current is None:
                current = {"fuzzy": fuzzy}
            key = word if not word.startswith("msgstr") else ("msgstr", int(m.group(2) or 0))
            if isinstance(key, tuple):
                current.setdefault("msgstr", {})[key[1]] = _po_string(m.group(3), path, lineno)
            else:
                current[key] = _po_string(m.group(3), path, lineno)
            continue
        if s.startswith('"') and current is not None and key is not None:
            if isinstance(key, tuple):
                current["msgstr"][key[1]] += _po_string(s, path, lineno)
            else:
                current[key] += _po_string(s, path, lineno)
            continue
        raise RecipeError(f"{path}:{lineno}: not a .po line: {s[:60]!r}")
    close()
    header = next((e.get("msgstr", {}).get(0, "") for e in entries if e["msgid"] == "" and "msgctxt" not in e), "")
    catalog = Catalog(path, _language(header, path))
    for e in entries:
        if e["msgid"] == "" and "msgctxt" not in e:
            continue
        forms = e.get("msgstr", {})
        _add(catalog, e["msgid"], e.get("msgid_plural"), [forms[k] for k in sorted(forms)])
    return catalog


def read_catalog(path: str) -> Catalog:
    return read_mo(path) if path.endswith(".mo") else read_po(path)
