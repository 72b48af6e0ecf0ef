"""Evaluation: every metric of the kit lives here, and both trainers call it for periodic evaluation.

  python evaluate.py --suite all                      # the paper's 31 zero-shot tasks
  python evaluate.py --ckpt pi.pt --ckpt base.pt --suite vtab --data-root DIR

Sections:
  NIGHTS 2AFC   DreamSim's two-alternative forced-choice score (stage 1's metric)
  zero-shot     CLIP_benchmark's classification and retrieval metrics, tasks, tables and the CLI
"""


# ---------------------------------------------------------------------------------------------------
# NIGHTS 2AFC
# ---------------------------------------------------------------------------------------------------

# (written by the stage-1 issue)


# ---------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------------

# (written by the evaluation issue)
