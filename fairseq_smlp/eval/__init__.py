"""Zero-shot in-context evaluation of fairseq language models (COPA, PIQA, StoryCloze,
Winogrande, HellaSwag, ReCoRD).

Nothing is registered with fairseq here: the modules are plain Python so that
``fairseq-smlp-zeroshot`` can score any fairseq LM checkpoint.

    zeroshot_tasks.py   task-file loaders -> list of Example (contexts, continuations, label)
    scoring.py          text -> token ids, batched log-likelihood of continuations, metrics
    zeroshot.py         the command line (checkpoint loading, table, results JSON)
"""
