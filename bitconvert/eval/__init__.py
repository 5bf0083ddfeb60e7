"""Evaluation: a ternary export and its original side by side, through lm-evaluation-harness.

    from bitconvert.eval import evaluate
    report = evaluate("tern", baseline="smollm2-135m", tasks=["piqa_local", "wikitext_local"],
                      data_dir="/data")
    print(report.table())
"""

from bitconvert.eval.data import LOCAL_TASKS, find_task_file, load_docs
from bitconvert.eval.errors import EvalError
from bitconvert.eval.report import EvalReport, EvalRow
from bitconvert.eval.runner import TaskTracker, evaluate, parse_task_names

__all__ = ["LOCAL_TASKS", "EvalError", "EvalReport", "EvalRow", "TaskTracker", "evaluate", "find_task_file",
           "load_docs", "parse_task_names"]
