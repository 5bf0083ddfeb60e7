"""Evaluation through lm-evaluation-harness: offline local tasks, side-by-side report, baseline cache.

The local tasks claim to be the harness's own tasks reading local files. The equivalence tests
build both task objects offline on the same docs (the harness's from its shipped YAML, with its
hub download swapped for those docs) and compare what the harness would send to a model: every
request (type, doc id, choice index, context and continuation strings), every target, and the
metric aggregation functions. They do not (cannot, offline) check that a local file holds the
same items as the hub dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bitconvert.eval import LOCAL_TASKS, EvalError, evaluate, find_task_file, load_docs
from bitconvert.eval.data import TASKS_DIR, read_piqa, read_wikitext

SHARED_DATA = Path(os.environ.get("BITCONVERT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAVE_SHARED = (SHARED_DATA / "piqa" / "valid.jsonl").is_file() and (SHARED_DATA / "wikitext-2" / "test.txt").is_file()

PIQA = [
    ("How do I open a jar?", "Twist the lid counterclockwise.", "Twist the lid into the freezer.", 0),
    ("To dry wet shoes,", "put them in the oven at full heat.", "stuff them with newspaper.", 1),
    ("Keep bread fresh", "in a closed bag.", "in a bowl of water.", 0),
    ("dresser", "replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ", 1),
    ("How to boil an egg", "Place it in boiling water for 8 minutes.", "Place it in cold oil for 8 seconds.", 0),
    ("Make a paper plane", "Fold a sheet of paper into wings.", "Crumple the paper into a ball.", 0),
]
WIKITEXT = (" \n = Robert <unk> = \n \n Robert <unk> is an English film , television and theatre actor . He had a "
            "guest @-@ starring role in 2000 . \n \n = = Career = = \n \n In 2004 he had a role as \" Craig \" in "
            "the episode \" Teddy 's Story \" . \n \n = Du Fu = \n \n Du Fu ( 712 – 770 ) was a prominent Chinese "
            "poet . Along with Li Bai , he is called the greatest of the Chinese poets . \n")
ARC_RELEASE = [
    {"id": "Q1", "question": {"stem": "Which gas do plants take in?", "choices": [
        {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"},
        {"text": "helium", "label": "C"}, {"text": "neon", "label": "D"}]}, "answerKey": "B"},
    {"id": "Q2", "question": {"stem": "What melts ice fastest?", "choices": [
        {"text": "salt", "label": "1"}, {"text": "sand", "label": "2"}, {"text": "paper", "label": "3"}]},
     "answerKey": "1"},
]
HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the "
     "window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "endings": [
         ", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting "
         "the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas "
         "coat, knitted with netting.", ", the man continues removing the snow on his car."], "label": 3},
    {"ind": 7, "activity_label": "Baking cookies", "ctx_a": "[header] How to bake cookies [title] Preheat the oven.",
     "ctx_b": "mix the dough", "endings": ["[step] Roll it into balls.", "Throw it away.", "Freeze the oven.",
                                            "Paint the dough."], "label": 0},
]


def write_data(root: Path) -> Path:
    """A data folder in bitconvert's layout, with the PIQA labels in a separate file as released."""
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "valid.jsonl").write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n"
                                                       for g, a, b, _ in PIQA))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{label}\n" for *_, label in PIQA))
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "test.txt").write_text(WIKITEXT)
    for folder, name in (("ARC-Easy", "ARC-Easy-Test.jsonl"), ("ARC-Challenge", "ARC-Challenge-Test.jsonl")):
        (root / folder).mkdir()
        (root / folder / name).write_text("".join(json.dumps(r) + "\n" for r in ARC_RELEASE))
    (root / "hellaswag").mkdir()
    (root / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    return root


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_data(tmp_path / "data")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama converted (per-channel scales) and exported; its manifest names the original."""
    from bitconvert.convert import convert_to_bitnet
    from bitconvert.export.packed import export_ternary
    from bitconvert.quant import QuantSpec
    from bitconvert.sources import load_model

    model, tokenizer = load_model(tiny_llama_dir)
    spec = QuantSpec(weight_scale="channel")
    convert_to_bitnet(model, spec, [])
    return export_ternary(model, tokenizer, tmp_path_factory.mktemp("exports") / "tern", spec,
                          provenance={"source": str(tiny_llama_dir)})


@pytest.fixture
def count_loads(monkeypatch):
    import bitconvert.sources

    loads: list[str] = []
    real = bitconvert.sources.load_model

    def counting(spec, **kwargs):
        loads.append(str(spec))
        return real(spec, **kwargs)

    monkeypatch.setattr(bitconvert.sources, "load_model", counting)
    return loads


# --------------------------------------------------------------------------- end to end


def test_eval_offline_side_by_side_then_cached(tiny_export, tiny_llama_dir, data_dir, corpus_file, tmp_path,
                                               monkeypatch, count_loads):
    from click.testing import CliRunner

    from bitconvert.cli import main

    monkeypatch.setenv("BITCONVERT_CACHE", str(tmp_path / "cache"))
    report = evaluate(tiny_export, tasks="piqa_local,wikitext_local", perplexity_files=[corpus_file], limit=2,
                      batch_size=4, device="cpu", data_dir=data_dir)
    assert count_loads == [str(tiny_export), str(tiny_llama_dir)]  # baseline taken from the export's manifest
    rows = {(r.task, r.metric): r for r in report.rows}
    assert set(rows) == {("piqa_local", "acc"), ("piqa_local", "acc_norm"), ("wikitext_local", "word_perplexity"),
                         ("wikitext_local", "byte_perplexity"), ("wikitext_local", "bits_per_byte"),
                         ("perplexity:corpus.txt", "token_perplexity"), ("perplexity:corpus.txt", "word_perplexity"),
                         ("perplexity:corpus.txt", "bits_per_byte")}
    for row in report.rows:
        assert row.original is not None and row.ternary is not None
        assert row.delta == pytest.approx(row.ternary - row.original)
    assert rows["piqa_local", "acc"].n == 2 and rows["piqa_local", "acc"].higher_is_better is True
    assert rows["wikitext_local", "word_perplexity"].n == 2  # two articles in the sample
    ppl = rows["perplexity:corpus.txt", "token_perplexity"]
    assert ppl.higher_is_better is False and 256 < ppl.n <= 2 * 256 + 1  # limit = 2 windows of max_length 256
    assert ppl.original != ppl.ternary  # ternary weights change the scores
    table = report.table()
    assert table.splitlines()[0].split() == ["task", "metric", "n", "original", "ternary", "delta"]
    assert "piqa_local" in table and "token_perplexity" in table

    results = json.loads((tiny_export / "eval" / "results.json").read_text())
    assert results["baseline"] == str(tiny_llama_dir) and len(results["rows"]) == 8
    assert results["settings"]["limit"] == 2 and results["software"]["lm_eval"]
    assert results["original"]["piqa_local"]["n-samples"]["piqa_local"]["effective"] == 2
    card = (tiny_export / "README.md").read_text()
    assert "## Evaluation" in card and "| piqa_local | acc ↑ | 2 |" in card
    from bitconvert.export.packed import read_manifest

    read_manifest(tiny_export)  # results and card are outside the manifest: the export still verifies

    # Same command through the CLI: the baseline's scores come from the cache, only the export loads.
    count_loads.clear()
    out = CliRunner().invoke(main, ["eval", str(tiny_export), "--baseline", str(tiny_llama_dir), "--tasks",
                                    "piqa_local,wikitext_local", "--perplexity", str(corpus_file), "--limit", "2",
                                    "--batch-size", "4", "--device", "cpu", "--data-dir", str(data_dir)])
    assert out.exit_code == 0, out.output
    assert count_loads == [str(tiny_export)]
    assert "original scores from cache for: piqa_local, wikitext_local, perplexity:corpus.txt" in out.output
    rerun = json.loads((tiny_export / "eval" / "results.json").read_text())["rows"]
    again = {(r["task"], r["metric"]): r for r in rerun}
    for key, row in rows.items():
        assert again[key]["original"] == pytest.approx(row.original)
        assert again[key]["ternary"] == pytest.approx(row.ternary)

    # A different limit changes the score, so it is a different cache entry.
    count_loads.clear()
    evaluate(tiny_export, tasks=["piqa_local"], limit=1, batch_size=4, device="cpu", data_dir=data_dir)
    assert count_loads == [str(tiny_export), str(tiny_llama_dir)]


def test_task_data_paths_and_env_var(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("BITCONVERT_DATA", raising=False)
    piqa = data_dir / "piqa" / "valid.jsonl"
    assert find_task_file("piqa_local", data_paths={"piqa_local": piqa}) == piqa
    assert find_task_file("piqa_local", data_paths={"piqa_local": piqa.parent}) == piqa
    monkeypatch.setenv("BITCONVERT_DATA", str(data_dir))
    assert find_task_file("wikitext_local") == data_dir / "wikitext-2" / "test.txt"
    docs = load_docs("piqa_local")
    assert [d["label"] for d in docs] == [p[3] for p in PIQA] and docs[0]["goal"] == PIQA[0][0]


def test_missing_data_and_unknown_tasks_fail_before_loading(tiny_export, data_dir, tmp_path, monkeypatch, count_loads):
    monkeypatch.delenv("BITCONVERT_DATA", raising=False)
    with pytest.raises(EvalError, match=r"no data folder was given: pass --data-dir .*BITCONVERT_DATA"):
        evaluate(tiny_export, tasks=["piqa_local"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match=r"piqa_local: no data at .*piqa/valid\.jsonl"):
        evaluate(tiny_export, tasks=["piqa_local"], data_dir=empty)
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(tiny_export, tasks=["piqa_local"], data_dir=tmp_path / "nowhere")
    (data_dir / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(EvalError, match="labels file .*valid-labels.lst does not exist"):
        evaluate(tiny_export, tasks=["piqa_local"], data_dir=data_dir)
    with pytest.raises(EvalError, match="not a local task .*did you mean 'piqa_local'"):
        evaluate(tiny_export, tasks=["piqa_local"], task_data={"piqa": data_dir})
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate(tiny_export, tasks=[])
    with pytest.raises(EvalError, match="perplexity file .* does not exist"):
        evaluate(tiny_export, perplexity_files=[tmp_path / "missing.txt"])
    # Names outside bitconvert's local tasks are checked against the harness's whole task index
    # (seconds to build, so two cases only): an unknown name, and a hub task with no network.
    with pytest.raises(EvalError, match=r"unknown task 'wikitext_locl'; did you mean .*wikitext_local"):
        evaluate(tiny_export, tasks=["piqa", "wikitext_locl"], data_dir=data_dir)
    import datasets

    def offline(path, *args, **kwargs):  # what datasets raises offline, whatever this machine has cached
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EvalError, match=r"task 'piqa' could not load its data .*use bitconvert's piqa_local"):
        evaluate(tiny_export, tasks=["piqa"], data_dir=data_dir)
    assert count_loads == []


def test_cli_reports_eval_errors_in_one_line(tiny_export, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bitconvert.cli import main

    monkeypatch.delenv("BITCONVERT_DATA", raising=False)
    result = CliRunner().invoke(main, ["eval", str(tiny_export), "--tasks", "piqa_local", "--data-dir",
                                       str(tmp_path)])
    assert result.exit_code == 2
    assert "error: piqa_local: no data at" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["eval", str(tiny_export), "--tasks", "piqa_local", "--task-data", "piqa_local"])
    assert result.exit_code == 2 and "TASK=PATH" in result.output


# --------------------------------------------------------------------------- readers


def test_read_wikitext_splits_articles_at_level_one_titles(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text(WIKITEXT)
    pages = read_wikitext(path)
    assert [p["page"].splitlines()[0] for p in pages] == [" = Robert <unk> = ", " = Du Fu = "]
    assert " = = Career = = " in pages[0]["page"]  # section headings stay inside their article
    assert "".join(p["page"] for p in pages) == WIKITEXT.removeprefix(" \n")  # only the blank first line goes


@pytest.mark.skipif(not HAVE_SHARED, reason="shared PIQA/WikiText-2 data not present")
def test_shared_data_reads_as_expected():
    piqa = read_piqa(SHARED_DATA / "piqa" / "valid.jsonl")
    assert len(piqa) == 1838 and {d["label"] for d in piqa} == {0, 1}
    # The harness's wikitext-2 test split has 62 documents; the tokenized release splits the same way.
    assert len(read_wikitext(SHARED_DATA / "wikitext-2" / "test.txt")) == 62


def test_read_piqa_rejects_label_count_mismatch(data_dir):
    (data_dir / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(EvalError, match="holds 2 labels but .* holds 6 questions"):
        read_piqa(data_dir / "piqa" / "valid.jsonl")


# --------------------------------------------------------------------------- equivalence with the harness


def _harness_task(hub_task: str, docs: list[dict]):
    """The harness's own task, built from its shipped YAML, with its hub download replaced by ``docs``."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.tasks.__file__).parent
    yaml_path = {"piqa": "piqa/piqa.yaml", "wikitext": "wikitext/wikitext.yaml", "arc_easy": "arc/arc_easy.yaml",
                 "arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml"}[hub_task]
    cfg = load_yaml(folder / yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    splits = [cfg.get(s) for s in ("training_split", "validation_split", "test_split") if cfg.get(s)]
    dataset = datasets.Dataset.from_list(docs)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: dataset for s in splits})
    return ConfigurableTask(config=cfg)


def _local_task(name: str, data_dir: Path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    return manager.load([name])["tasks"][name]


def _what_the_model_sees(task) -> dict:
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    docs = list(task.eval_docs)
    seen = {"output_type": task.OUTPUT_TYPE, "n_docs": len(docs),
            "requests": [(i.request_type, i.doc_id, i.idx, i.arguments) for i in task.instances],
            "targets": [task.doc_to_target(d) for d in docs],
            "aggregation": task.aggregation(), "higher_is_better": task.higher_is_better()}
    if task.OUTPUT_TYPE == "multiple_choice":
        seen["choices"] = [task.doc_to_choice(d) for d in docs]
    return seen


EQUIVALENT = ["piqa_local", "arc_easy_local", "arc_challenge_local", "hellaswag_local", "wikitext_local"]


@pytest.mark.parametrize("name", EQUIVALENT)
def test_local_task_sends_the_same_requests_as_the_harness_task(name, data_dir):
    """Same docs through both task definitions -> identical requests, targets and metrics."""
    root = SHARED_DATA if HAVE_SHARED and name in ("piqa_local", "wikitext_local") else data_dir
    docs = load_docs(name, root)
    local = _what_the_model_sees(_local_task(name, root))
    harness = _what_the_model_sees(_harness_task(LOCAL_TASKS[name].hub_task, docs))
    assert local["n_docs"] == len(docs) > 0
    assert local == harness
    if name == "piqa_local":
        context, continuation = local["requests"][0][3]
        assert context == f"Question: {docs[0]['goal']}\nAnswer:" and continuation == f" {docs[0]['sol1']}"


def test_piqa_local_scores_match_the_harness_piqa(data_dir, tiny_llama_dir):
    """End to end on a tiny model: the harness's evaluator gives the same numbers for both tasks."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from bitconvert.sources import load_model

    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(tiny_llama_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    manager = TaskManager(include_defaults=False)  # the tasks are built already; skip indexing the harness
    local = simple_evaluate(model=lm, tasks=[_local_task("piqa_local", data_dir)], log_samples=False,
                            bootstrap_iters=0, task_manager=manager)["results"]["piqa_local"]
    harness = simple_evaluate(model=lm, tasks=[_harness_task("piqa", load_docs("piqa_local", data_dir))],
                              log_samples=False, bootstrap_iters=0, task_manager=manager)["results"]["piqa"]
    def accuracies(results):
        return {k: v for k, v in results.items() if k.startswith("acc")}

    assert accuracies(local) == accuracies(harness) and len(accuracies(local)) == 4  # acc, acc_norm and stderrs


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_scores_are_sane(smollm2, tmp_path, data_dir, monkeypatch):
    """SmolLM2-135M through the whole path: its perplexity is a real LM's, its post-training ternary
    copy (no QAT) is much worse."""
    import copy

    from bitconvert.convert import convert_to_bitnet
    from bitconvert.export.packed import export_ternary
    from bitconvert.quant import QuantSpec

    monkeypatch.setenv("BITCONVERT_CACHE", str(tmp_path / "cache"))
    model, tokenizer = smollm2
    student = copy.deepcopy(model)
    spec = QuantSpec(weight_scale="channel")
    convert_to_bitnet(student, spec, [])
    export = export_ternary(student, tokenizer, tmp_path / "tern", spec, dtype=torch.float32,
                            provenance={"source": "smollm2-135m"})
    text = tmp_path / "wiki.txt"
    text.write_text(WIKITEXT * 20)
    report = evaluate(export, tasks=["piqa_local"], perplexity_files=[text], limit=1, batch_size=4, device="cpu",
                      data_dir=data_dir, max_length=256)
    rows = {(r.task, r.metric): r for r in report.rows}
    ppl = rows["perplexity:wiki.txt", "token_perplexity"]
    assert 256 <= ppl.n <= 257 and 1 < ppl.original < 200 and ppl.ternary > 2 * ppl.original
    assert rows["piqa_local", "acc"].n == 1
