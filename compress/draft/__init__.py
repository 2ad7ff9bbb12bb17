"""Compressed models as speculative-decoding drafters: teacher-forced draft-eval and one measured loop.

Every name below imports torch; it is bound on first use, so that reading the recipe schema (which
imports the self-spec step's config, ``selfspec/config.py``) does not.
"""
from compress.deferred import deferred_names

_WHERE = {
    "agreement": ("DEFAULT_GAMMAS", "best_stop_threshold", "draft_eval", "read_prompts", "replay_greedy_rounds",
                  "score_positions", "tau_iid"),
    "eager": ("EagerDecoder", "speculative_generate", "target_generate"),
    "loop": ("run_speculative", "run_target"),
    "speculative": ("SpecResult", "check_same_vocabulary", "mean_tokens_per_target_call", "process_logits",
                    "verify_greedy", "verify_sampled"),
}
__getattr__ = deferred_names(__name__, {name: f"compress.draft.{module}" for module, names in _WHERE.items()
                                        for name in names})

__all__ = sorted(name for names in _WHERE.values() for name in names)
