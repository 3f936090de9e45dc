"""Evaluation: `harness.py` (lm-evaluation-harness on a checkpoint folder, validation loss and KL on
a pack: `launch/evaluate.py`, uptraining's --eval-tasks) and `report.py` (Table 3 and the accuracy
against KV-cache plot from the results: `launch/report.py`)."""
