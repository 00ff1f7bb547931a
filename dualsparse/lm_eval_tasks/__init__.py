"""lm-evaluation-harness tasks shipped with dualsparse (see dualsparse.builtin.lm_eval_tasks_dir)."""
