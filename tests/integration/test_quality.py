"""How good a trained model is: every family, trained a fixed number of updates on the bundled
corpus (the `data_bin` slice of Penn Treebank) through fairseq's Trainer, in fp32 and bf16,
must reach the validation perplexity of a measured good run (tests/quality_reference.json)
within 15%, and not beat it by more than 15% either (a model that suddenly scores far better
than it did is as suspicious as one that scores worse: a causality leak lowers perplexity).

Refresh the reference after a deliberate change of a model or of the training recipe:
    python tests/integration/test_quality.py --write [FAMILY ...] (every family, or those named; the file records the machine)
    python tests/integration/test_quality.py --write-quickstart   (test_quickstart.py's fixed-update quickstart)
"""
import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]  # conftest.py and quality_reference.json
if __name__ == "__main__":  # run as a script (the commands above): conftest.py is one folder up
    sys.path.insert(0, str(TESTS))

from conftest import fairseq_trainer, in_parallel  # noqa: E402

REFERENCE = TESTS / "quality_reference.json"
pytestmark = pytest.mark.slow
FAMILIES = {
    "smlp": ["--arch", "smlp_lm_tiny"],  # the paper's: Base-routed tMoE
    "smlp_top1": ["--arch", "smlp_lm_tiny", "--tmoe-router", "top1"],
    # the other tMoE routers (docs/routers.md)
    "smlp_top1_biased": ["--arch", "smlp_lm_tiny", "--tmoe-router", "top1_biased"],
    "smlp_sinkhorn": ["--arch", "smlp_lm_tiny", "--tmoe-router", "sinkhorn"],
    "smlp_causal_balanced": ["--arch", "smlp_lm_tiny", "--tmoe-router", "causal_balanced"],
    "smlp_top1_dropless": ["--arch", "smlp_lm_tiny", "--tmoe-router", "top1", "--tmoe-train-capacity-factor", "0"],
    "gmlp": ["--arch", "gmlp_lm_tiny"],
    "transformer": ["--arch", "transformer_lm_tiny"],
    "switch": ["--arch", "switch_lm_tiny"],
    "gshard": ["--arch", "gshard_lm_tiny"],
    "base": ["--arch", "base_lm_tiny"],
    "hash": ["--arch", "hash_lm_tiny"],
}
PRECISIONS = {"fp32": [], "bf16": ["--bf16"]}
UPDATES = 60
TRAIN = [
    "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32",
    "--max-tokens", "512", "--required-batch-size-multiple", "1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
    "--lr", "0.003", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "30", "--clip-norm", "1.0",
    "--dropout", "0.0", "--cpu", "--num-workers", "0", "--seed", "1", "--moe-aux-loss-weight", "0.01",
]
TOLERANCE = 0.15


def train_and_validate(data_bin, family: str, precision: str, updates: int = UPDATES) -> float:
    """Validation perplexity after `updates` updates (fairseq's Trainer, as fairseq-train runs it)."""
    cfg, task, trainer = fairseq_trainer(data_bin, *TRAIN, *FAMILIES[family], *PRECISIONS[precision])
    epoch_itr = trainer.get_train_iterator(epoch=1, load_dataset=True)
    done = 0
    while done < updates:
        trainer.begin_epoch(epoch_itr.epoch)
        for sample in epoch_itr.next_epoch_itr(shuffle=True):
            trainer.train_step([sample])
            done += 1
            if done == updates:
                break
        else:
            epoch_itr = trainer.get_train_iterator(epoch_itr.epoch + 1, load_dataset=False)
    return validation_ppl(cfg, task, trainer)


def validation_ppl(cfg, task, trainer) -> float:
    """The validation perplexity fairseq-train would log (its metrics, over the whole split)."""
    from fairseq.logging import metrics

    valid = task.get_batch_iterator(task.dataset("valid"), max_tokens=cfg.dataset.max_tokens, seed=1, num_workers=0)
    with metrics.aggregate(new_root=True) as agg:
        for sample in valid.next_epoch_itr(shuffle=False):
            trainer.valid_step(sample)
    return 2 ** agg.get_smoothed_values()["nll_loss"]


@pytest.fixture(scope="module")
def measured(data_bin):
    """{(family, precision): validation perplexity}, trained once for the module, one thread per
    training, as many trainings at a time as there are CPUs (the reference was measured so)."""
    runs = [(f, p) for f in FAMILIES for p in PRECISIONS]
    return dict(zip(runs, in_parallel(train_and_validate, [(data_bin, f, p) for f, p in runs])))


def reference(section: str = "valid_ppl") -> dict:
    """A section of the measured reference: "valid_ppl" (the families) or "quickstart"."""
    return json.loads(REFERENCE.read_text())[section]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_trained_model_reaches_its_measured_quality(measured, family, precision):
    ppl, good = measured[family, precision], reference()[family][precision]
    assert ppl <= good * (1 + TOLERANCE), f"{family} {precision}: valid ppl {ppl:.2f}, a good run reached {good:.2f}"
    assert ppl >= good * (1 - TOLERANCE), f"{family} {precision}: valid ppl {ppl:.2f} far below a good run's {good:.2f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_trains_as_well_as_fp32(measured, family):
    fp32, bf16 = measured[family, "fp32"], measured[family, "bf16"]
    assert abs(bf16 - fp32) / fp32 < 0.03, (family, fp32, bf16)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_smlp_keeps_up_with_gmlp(measured, precision):
    """At equal updates (and equal FLOPs per token, the *_tiny archs), sMLP is within 5% of gMLP."""
    for smlp in ("smlp", "smlp_top1"):
        assert measured[smlp, precision] <= 1.05 * measured["gmlp", precision], (smlp, precision, measured)


def write_reference(families=()) -> None:
    """Measure every family (or those named) in both precisions and record the figures (run by hand)."""
    import tempfile

    from conftest import make_ptb_data_bin

    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--write: unknown families {unknown}; one of {', '.join(FAMILIES)}")
    table = reference() if families and REFERENCE.exists() else {}
    with tempfile.TemporaryDirectory() as root:
        data_bin = make_ptb_data_bin(Path(root))
        runs = [(f, p) for f in (families or FAMILIES) for p in PRECISIONS]
        for (family, precision), ppl in zip(runs, in_parallel(train_and_validate, [(data_bin, f, p) for f, p in runs])):
            table.setdefault(family, {})[precision] = round(ppl, 2)
        print(json.dumps(table, indent=1), flush=True)
    command = " ".join(["python tests/integration/test_quality.py --write", *families])
    if not families:
        return update_reference({"valid_ppl": table, "updates": UPDATES, "command": command})
    # families added to an existing reference: their own command and provenance, the file's kept
    from fairseq_smlp.quickstart import provenance

    stamp = {k: v for k, v in provenance().items() if k in ("commit", "machine", "torch")}
    added = json.loads(REFERENCE.read_text()).get("added", []) + [{"families": list(families), "command": command, **stamp}]
    update_reference({"valid_ppl": table, "added": added}, stamp=False)


def write_quickstart_reference() -> None:
    """The quickstart at test_quickstart.QUICK_UPDATES updates in both precisions (run by hand)."""
    import tempfile

    from test_quickstart import QUICK_UPDATES, quickstart

    table = {}
    for precision in ("bf16", "fp32"):
        with tempfile.TemporaryDirectory() as root:
            out = quickstart(Path(root) / "qs", precision)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            results = json.loads((Path(root) / "qs" / "results.json").read_text())
        table[precision] = {key: results[key] for key in ("valid_ppl", "test_ppl")}
        print(precision, table[precision], flush=True)
    update_reference({"quickstart": table, "quickstart_updates": QUICK_UPDATES,
                      "quickstart_command": "python tests/integration/test_quality.py --write-quickstart"})


def update_reference(entries: dict, stamp: bool = True) -> None:
    """Merge entries into the reference file, with where and from which code they came (stamp)."""

    from fairseq_smlp.atomic_write import atomic_write_text
    from fairseq_smlp.quickstart import provenance

    current = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    current.update(entries)
    if stamp:
        current.update({k: v for k, v in provenance().items() if k in ("commit", "machine", "torch")})
    atomic_write_text(REFERENCE, json.dumps(current, indent=2) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["--write"]:
    write_reference(tuple(sys.argv[2:]))
elif __name__ == "__main__" and sys.argv[1:] == ["--write-quickstart"]:
    write_quickstart_reference()
