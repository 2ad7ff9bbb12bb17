"""Compressed models as speculative-decoding drafters: teacher-forced draft-eval and one measured loop."""
from compress.draft.agreement import (DEFAULT_GAMMAS, best_stop_threshold, draft_eval, read_prompts,
                                      replay_greedy_rounds, score_positions, tau_iid)
from compress.draft.eager import EagerDecoder, speculative_generate, target_generate
from compress.draft.loop import run_speculative, run_target
from compress.draft.speculative import (SpecResult, check_same_vocabulary, mean_tokens_per_target_call,
                                        process_logits, verify_greedy, verify_sampled)

__all__ = ["DEFAULT_GAMMAS", "EagerDecoder", "SpecResult", "best_stop_threshold", "check_same_vocabulary",
           "draft_eval", "mean_tokens_per_target_call", "process_logits", "read_prompts", "replay_greedy_rounds",
           "run_speculative", "run_target", "score_positions", "speculative_generate", "target_generate",
           "tau_iid", "verify_greedy", "verify_sampled"]
