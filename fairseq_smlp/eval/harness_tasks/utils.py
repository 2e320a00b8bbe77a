"""Documents of the fairseq-smlp zero-shot tasks for lm-evaluation-harness.

The task YAMLs beside this file load their documents with ``load`` below: the LOCAL task
files (nothing is downloaded) read by fairseq-smlp's own loaders, so the harness sees
exactly the prompts of fairseq-smlp-zeroshot. The folder comes from --metadata
'{"data_dir": "..."}', else $SMLP_ZEROSHOT_DIR, else ../shared/data/zeroshot;
smlp_task_file reads --metadata '{"task_file": "my.jsonl"}' (the generic schema).

A document holds the candidates as (contexts, continuations): full scoring (one context,
the choices are scored) or partial scoring (one context per choice, the shared
continuation is scored: the harness's "multiple inputs", as its winogrande does).
"""
import os


def load(task=None, data_dir=None, task_file=None, **metadata):
    import datasets

    from fairseq_smlp.eval.scoring import gold_indices
    from fairseq_smlp.eval.zeroshot import default_data_dir
    from fairseq_smlp.eval.zeroshot_tasks import TASKS, find_task_file, load_multiple_choice

    if task == "file":
        if not task_file:
            raise ValueError("smlp_task_file: pass --metadata '{\"task_file\": \"PATH.jsonl\"}'")
        examples = load_multiple_choice(task_file)
    else:
        spec = TASKS[task]
        folder = data_dir or os.environ.get("SMLP_ZEROSHOT_DIR") or default_data_dir()
        examples = spec.load(find_task_file(spec, folder))
    docs = [{"contexts": ex.contexts, "continuations": ex.continuations, "label": ex.label,
             "gold": gold_indices(ex), "partial": len(set(ex.contexts)) > 1} for ex in examples]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def text(doc):
    """The context; for partial scoring the gold index (the harness then reads the
    contexts from doc_to_choice and the scored text from doc_to_target)."""
    return doc["label"] if doc["partial"] else doc["contexts"][0]


def choices(doc):
    return doc["contexts"] if doc["partial"] else doc["continuations"]


def target(doc):
    return doc["continuations"][0] if doc["partial"] else doc["label"]


def gold(doc):
    """ReCoRD: every entity that matches a gold answer (so that acc = exact match)."""
    return doc["gold"]
