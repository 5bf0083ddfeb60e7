"""Task YAMLs for lm-evaluation-harness: the harness's own tasks, reading local files (see ../data.py)."""
