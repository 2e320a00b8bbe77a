"""Zero-shot in-context evaluation of fairseq language models (COPA, PIQA, StoryCloze,
Winogrande, HellaSwag, ReCoRD, and any multiple-choice file in the generic schema).

Nothing is registered with fairseq here: the modules are plain Python so that
``fairseq-smlp-zeroshot`` can score any fairseq LM checkpoint.

    zeroshot_tasks.py   task-file loaders -> list of Example (contexts, continuations, label);
                        the generic JSON-lines schema (--task-file) and `export`
    text.py             text -> token ids (--normalize none / ptb / auto, sentencepiece)
    scoring.py          batch-independent log-likelihood of continuations, every rule's metrics
    zeroshot.py         the command line (checkpoint loading, table, results JSON, predictions)
    harness.py          lm-evaluation-harness model `fairseq_smlp` (+ harness_tasks/ YAMLs)
"""
