"""The lm-evaluation-harness adapter: the harness's acc / acc_norm equal fairseq-smlp-zeroshot's
prediction for prediction, loglikelihood_rolling equals fairseq's SequenceScorer on
fairseq-eval-lm's blocks, and the command line registers the model."""
import json

import pytest

from fairseq_smlp.eval import harness, zeroshot  # lm-eval is in the test extra: no skip
from fairseq_smlp.eval.scoring import Candidate
from zeroshot_helpers import rolling_text, run, tiny_checkpoint, write_task_files

SIX = ["copa", "piqa", "storycloze", "winogrande", "hellaswag", "record"]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_task_files(tmp_path_factory.mktemp("harness_tasks"))


def harness_samples(lm, tasks_dir, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(harness.TASK_DIR), metadata={"data_dir": str(tasks_dir)})
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=20, log_samples=True)
    return out["results"], out["samples"]


@pytest.mark.parametrize("kind,tasks", [("transformer", SIX), ("smlp_partial", ["copa", "winogrande", "hellaswag"])])
def test_harness_equals_zeroshot_prediction_for_prediction(kind, tasks, tasks_dir, tmp_path):
    ckpt = tiny_checkpoint(kind)
    preds = tmp_path / "preds.jsonl"
    zeroshot.cli_main(["--path", str(ckpt), "--data-dir", str(tasks_dir), "--cpu", "--no-progress",
                       "--tasks", ",".join(tasks), "--max-examples", "20", "--predictions", str(preds)])
    mine = [json.loads(line) for line in preds.read_text().splitlines()]

    lm = harness.FairseqLM(path=str(ckpt), batch_size=3, device="cpu")
    assert (lm.prefix > 0) == (kind == "smlp_partial")
    results, samples = harness_samples(lm, tasks_dir, [f"smlp_{t}" for t in tasks])
    for task in tasks:
        ours = [r for r in mine if r["task"] == task]
        theirs = sorted(samples[f"smlp_{task}"], key=lambda s: s["doc_id"])
        assert len(theirs) == len(ours) == 20
        for r, s in zip(ours, theirs):
            lls = [ll for ll, _ in s["filtered_resps"]]
            if kind == "transformer":
                assert lls == [c["logprob"] for c in r["choices"]]  # the same scorer: bitwise
            else:  # token-routed experts: other forwards, the last float digit may move (SpanScorer)
                assert lls == pytest.approx([c["logprob"] for c in r["choices"]], abs=1e-5)
            assert max(range(len(lls)), key=lls.__getitem__) == r["predictions"]["acc"]
            assert s["acc"] == float(r["predictions"]["acc"] in (r["gold"] if isinstance(r["gold"], list) else [r["gold"]]))
            if task != "winogrande":  # (the harness's acc_norm divides partial scoring by the contexts' length)
                gold = r["gold"] if isinstance(r["gold"], list) else [r["gold"]]
                assert s["acc_norm"] == float(r["predictions"]["acc_norm"] in gold)
        accs = [float(r["correct"]) for r in ours]
        if task != "hellaswag":  # hellaswag's paper-style rule is acc_per_token, not the harness's acc
            assert results[f"smlp_{task}"]["acc,none"] == pytest.approx(sum(accs) / 20)


def test_task_file_through_the_harness(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"context": "the market", "choices": [" rose", " fell sharply", " was flat"],
                                        "label": i % 3}) + "\n" for i in range(6)))
    lm = harness.FairseqLM(path=str(tiny_checkpoint("transformer")), device="cpu")
    manager = TaskManager(include_path=str(harness.TASK_DIR), metadata={"task_file": str(path)})
    out = lm_eval.simple_evaluate(model=lm, tasks=["smlp_task_file"], task_manager=manager, log_samples=True)
    assert out["results"]["smlp_task_file"]["acc,none"] == pytest.approx(1 / 3)  # same question, 3 labels
    with pytest.raises(NotImplementedError, match="does not generate"):
        lm.generate_until([])


def test_rolling_windows():
    tokens = list(range(10, 30))  # 20 tokens, eos = 2
    causal = harness.rolling_candidates(tokens, 2, window=8)
    assert causal == [Candidate([2] + tokens[:8], 8, False), Candidate(tokens[7:16], 8, False),
                      Candidate(tokens[15:20], 4, False)]  # fairseq-eval-lm's blocks of 8
    partial = harness.rolling_candidates(tokens, 2, window=8, prefix=3)
    scored = [t for c in partial for t in c.tokens[len(c.tokens) - c.n_cont:]]
    assert scored == tokens  # every token scored once, in order
    for c in partial:
        assert len(c.tokens) - 1 <= 8 and len(c.tokens) - 1 - c.n_cont >= 3  # window; >= P inputs before
    assert partial[0].tokens == [2, 2, 2, 2] + tokens[:5]
    with pytest.raises(ValueError, match="routing prefix"):
        harness.rolling_candidates(tokens, 2, window=3, prefix=3)


def sequence_scorer_blocks(ckpt):
    """fairseq-eval-lm's per-token scores of the checkpoint's test split (blocks of
    --tokens-per-sample 64), from fairseq's SequenceScorer, in block order."""
    import torch
    from fairseq import checkpoint_utils, utils
    from fairseq.sequence_scorer import SequenceScorer

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)])
    model = models[0].eval()
    task.load_dataset("test")
    itr = task.eval_lm_dataloader(task.dataset("test"), max_tokens=4096, batch_size=4,
                                  max_positions=utils.resolve_max_positions(model.max_positions()),
                                  num_shards=1, shard_id=0, num_workers=0)
    scorer, blocks = SequenceScorer(task.target_dictionary), {}
    with torch.no_grad():
        for sample in itr:
            for i, hypos in zip(sample["id"].tolist(), scorer.generate([model], sample)):
                blocks[i] = hypos[0]["positional_scores"].tolist()
    return [blocks[i] for i in sorted(blocks)]


@pytest.mark.parametrize("kind", ["transformer", "smlp"])
def test_loglikelihood_rolling_equals_fairseq_eval_lm_blocks(kind):
    from lm_eval.api.instance import Instance

    ckpt = tiny_checkpoint(kind)  # its data-bin's test split is rolling_text()
    lm = harness.FairseqLM(path=str(ckpt), device="cpu", batch_size=2)
    theirs = sequence_scorer_blocks(ckpt)
    mine = lm.rolling_token_logprobs(rolling_text())
    assert [len(b) for b in mine] == [len(b) for b in theirs] and len(mine) > 5
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-5)
    request = Instance("loglikelihood_rolling", {}, (rolling_text(),), 0)
    [total] = lm.loglikelihood_rolling([request])
    assert total == pytest.approx(sum(map(sum, theirs)), abs=1e-3)


def test_command_line_registers_the_model(tasks_dir, tmp_path):
    ckpt = tiny_checkpoint("transformer")
    proc = run(["-m", "fairseq_smlp.eval.harness", "--model", "fairseq_smlp", "--model_args", f"path={ckpt}",
                "--include_path", str(harness.TASK_DIR), "--tasks", "smlp_copa", "--limit", "5",
                "--device", "cpu", "--batch_size", "4", "--metadata", json.dumps({"data_dir": str(tasks_dir)})],
               tmp_path)
    assert "smlp_copa" in proc.stdout and "acc_norm" in proc.stdout
    assert run(["-m", "fairseq_smlp.eval.harness", "--task-dir"], tmp_path).stdout.strip() == str(harness.TASK_DIR)
