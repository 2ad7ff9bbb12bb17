"""Corpora (registry packages, the stdlib, local files), seeded splits and calibration sets."""
from compress.data.calibration_set import (CalibrationSet, build_calibration_set,
                                           tokenizer_fingerprint)
from compress.data.corpora import SPLITS, corpus_text, list_corpora, load_corpus

__all__ = ["SPLITS", "CalibrationSet", "build_calibration_set", "corpus_text", "list_corpora",
           "load_corpus", "tokenizer_fingerprint"]
