"""Router health in the log: load entropy, unused experts, tokens that changed expert since
the last validation (moe/health.py, criterions/moe_cross_entropy.py), for every token router."""
import math

import pytest
import torch

from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyCriterion, routing_log
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.moe.health import ChoiceMemory, changed_tokens, load_entropy
from fairseq_smlp.moe.router import Router

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH = 40, 16, 4


def test_load_entropy_is_one_when_balanced_and_zero_when_one_expert_takes_all():
    assert load_entropy(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(1.0)
    assert load_entropy(torch.tensor([0.0, 12.0, 0.0, 0.0])).item() == pytest.approx(0.0)
    assert load_entropy(torch.tensor([7.0])).item() == 1.0
    half = torch.tensor([1.0, 1.0, 0.0, 0.0])  # two of four experts, evenly
    assert load_entropy(half).item() == pytest.approx(math.log(2) / math.log(4))


def test_changed_tokens_counts_differences():
    changed, compared = changed_tokens(torch.tensor([0, 1, 2, -1]), torch.tensor([0, 2, 2, 1]))
    assert (changed.item(), compared.item()) == (2, 4)
    with pytest.raises(ValueError):
        changed_tokens(torch.zeros(3), torch.zeros(4))


def test_choice_memory_compares_forward_by_forward_with_the_previous_pass():
    memory = ChoiceMemory()
    a, b = torch.tensor([0, 1, 2]), torch.tensor([3, 3])
    assert memory.compare(a) is None and memory.compare(b) is None  # the first pass: nothing to compare
    memory.training_forward()
    assert [x.item() for x in memory.compare(torch.tensor([0, 1, 1]))] == [1, 3]
    assert [x.item() for x in memory.compare(b)] == [0, 2]
    assert memory.compare(torch.tensor([1])) is None  # a forward the previous pass did not have
    memory.training_forward()
    assert [x.item() for x in memory.compare(torch.tensor([0, 1, 1]))] == [0, 3]  # against the last pass


def _model(router):
    """smlp_lm_tiny's experts, narrower, one sparse block: built as fairseq-train builds it."""
    args = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16",
            "--decoder-layers", "2", "--dropout", "0", "--tmoe-router", router]
    return build_model("smlp_lm_tiny", args, seq_len=SEQ, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))[0]


def _batch_stats(model, training: bool):
    model.train(training)
    tokens = torch.randint(4, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)[1]["moe_stats"]


def _token_routers(model):
    return [m for m in model.modules() if isinstance(m, Router) and m.remembers_choices]


@pytest.mark.parametrize("router", ["base", "top1", "top1_biased", "sinkhorn", "causal_balanced"])
def test_every_router_reports_the_tokens_that_changed_expert_between_validations(router):
    torch.manual_seed(0)
    model = _model(router)
    assert not any(s.compared is not None for s in _batch_stats(model, training=False))  # first validation
    _batch_stats(model, training=True)
    stats = [s for s in _batch_stats(model, training=False) if s.compared is not None]
    assert len(stats) == len(_token_routers(model)) > 0
    assert all(s.changed.item() == 0 and s.compared.item() == BATCH * SEQ for s in stats)  # nothing trained
    with torch.no_grad():  # what training between two validations does to the routers
        for r in _token_routers(model):
            for p in r.parameters():
                p.normal_(0, 1.0)
    _batch_stats(model, training=True)
    log = routing_log(_batch_stats(model, training=False))
    assert 0 < log["moe_changed"] <= log["moe_compared"] == BATCH * SEQ * len(stats)
    assert 0 <= log["moe_entropy"] <= 1


def test_the_log_reports_entropy_and_changed_shares_per_layer():
    from fairseq import metrics

    torch.manual_seed(0)
    model = _model("top1")
    for _ in range(2):  # the first validation: two batches
        _batch_stats(model, training=False)
    _batch_stats(model, training=True)
    logs = []
    for _ in range(2):  # two validation batches
        log = routing_log(_batch_stats(model, training=False))
        log["moe_changed"] = 3  # pretend: 3 of this batch's compared tokens changed
        log.update(moe_batches=1, nscored=1, sample_size=1, loss=0.0, nll_loss=0.0)
        logs.append(log)
    layer = next(k[: -len("_entropy")] for k in logs[0] if k.startswith("moe/") and k.endswith("_entropy"))
    assert logs[0][f"{layer}_entropy"] == pytest.approx(load_entropy(_batch_stats(model, False)[0].expert_counts).item())
    with metrics.aggregate() as aggregated:
        MoECrossEntropyCriterion.reduce_metrics(logs)
    values = aggregated.get_smoothed_values()
    assert values["moe_changed"] == pytest.approx(6 / (2 * logs[0]["moe_compared"]), abs=1e-4)  # a share of tokens
    assert "moe_compared" not in values and f"{layer}_compared" not in values
    assert values[f"{layer}_changed"] == 0 and 0 <= values["moe_entropy"] <= 1
