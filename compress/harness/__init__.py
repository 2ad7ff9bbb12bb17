"""lm-evaluation-harness tasks, offline, on the model the toolkit holds (``compress eval --tasks``,
a recipe's ``verify.tasks``). The catalog is pure data; running imports lm-eval (the ``eval`` extra)."""
from compress.harness.catalog import (OWN_TASKS, STANDARD_TASKS, available_tasks, check_lm_eval_installed,
                                      parse_task_list)

__all__ = ["OWN_TASKS", "STANDARD_TASKS", "available_tasks", "check_lm_eval_installed", "parse_task_list"]
