"""Recalibration: the recipe step ``recalibrate`` and the language-model uses of ``calibration/``.

    - {algorithm: recalibrate, method: temperature, target: tokens}       # ships T in generation_config
    - {algorithm: recalibrate, method: hcal, target: topics, max_examples: 200}

The step fits a calibrator on a held-out split (``validation`` by default; ``test`` is refused:
verify scores it) of the model *as it is at that point of the recipe*, so put it after the
compressing steps (a step after it that changes the weights is refused). It leaves an
``LMCalibrator`` (``compress.formats.calibrator``) in the run state; verify scores through it, the
export writes it to ``calibrator/`` and ``load_model`` attaches it.

Targets
- ``tokens``: next-token confidence over non-overlapping windows of ``corpus``/``split``.
  ``temperature`` is fitted on the full-vocabulary logits (exact temperature scaling) of at most
  ``max_logit_mb`` MB of them (default 256 MB: 1,365 tokens of SmolLM2's 49,152-word vocabulary,
  sampled evenly over all windows; L-BFGS keeps ~3 copies, so the fit peaks near 1 GB). It
  rescales the whole distribution: NLL and perplexity change, the argmax does not. Every other
  method is fitted in the top-label binary form on all tokens: score logit(max p), label "the
  argmax was right"; it maps the top-1 confidence only, so ECE changes and NLL / perplexity do
  not (no calibrated full distribution is defined).
- ``topics``: the five BBC label-word scores (``compress.tasks.topic_label_logits``) of
  ``max_examples`` articles; any method applies to the [N, 5] logits.

Other uses: a logistic head on ``minilm-l6`` mean-pooled embeddings (``embedding_topic_logits``).
A drafter's confidence against acceptance is calibrated with the drafting code:
``compress.draft.confidence.fit_drafter_calibrator``.

Files: ``config.py`` (the typed config, registered), ``step.py`` (the step), ``events.py`` (token
and topic events, fitting on them), ``embeddings.py``. Only the config is imported
with the package (the recipe schema needs it); every other name imports torch and is bound on
first use.
"""
from compress.deferred import deferred_names
from compress.recalibrate.config import FIT_SPLITS, RecalibrateConfig  # registers "recalibrate"

_WHERE = {
    "compress.formats.calibrator": ("CALIBRATOR_DIR", "USE_FILE", "LMCalibrator", "attached_calibrator",
                                    "load_lm_calibrator"),
    "compress.recalibrate.step": ("apply_recalibrate",),
    "compress.recalibrate.events": ("TokenEvents", "fit_token_calibrator", "logit_rows_within", "token_events",
                                    "topic_events"),
    "compress.recalibrate.embeddings": ("embedding_topic_logits", "mean_pooled_embeddings"),
}
__getattr__ = deferred_names(__name__, {name: module for module, names in _WHERE.items() for name in names})

__all__ = ["FIT_SPLITS", "RecalibrateConfig", *sorted(n for names in _WHERE.values() for n in names)]
