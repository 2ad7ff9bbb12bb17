"""Per-document results of ``stdlib_completion`` for lm-eval (named in its YAML as
``process_results: !function compress.harness.metrics.line_completion_results``).

lm-eval's plain loglikelihood results are the line's total log-likelihood (``perplexity`` =
exp(−mean total), which overflows for a weak model on long lines) and whether the greedy
continuation is the line (``acc``). Scoring per byte makes lines of every length comparable and
is what lm-eval's own perplexity tasks report: ``bits_per_byte`` and ``byte_perplexity``
(aggregations ``bits_per_byte`` and ``weighted_perplexity`` of (log-likelihood, bytes) pairs).
"""
from __future__ import annotations


def scored_bytes(context: str, line: str) -> int:
    """UTF-8 bytes of what lm-eval scores: it moves the context's trailing whitespace (the newline
    before the line) into the continuation."""
    tail = context[len(context.rstrip()):]
    return len((tail + line).encode("utf-8"))


def line_completion_results(doc: dict, results: list) -> dict:
    ll, is_greedy = results[0]
    pair = (ll, scored_bytes(doc["context"], doc["line"]))
    return {"acc": int(is_greedy), "bits_per_byte": pair, "byte_perplexity": pair}
