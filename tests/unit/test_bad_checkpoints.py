"""Checkpoints and dictionaries that do not belong together, at unit level: dictionary identity
(models/vocabulary.py), what reshard keeps or refuses. The same through the real commands:
test_bad_input.py; interrupted saves (crash.pt, stale temporaries): test_fairseq_patches.py."""
import pickle

import pytest
import torch
from conftest import build_tiny_smlp, tiny_dictionary

import fairseq_smlp  # noqa: F401  (installs the patches)
from fairseq_smlp.checkpoints import reshard
from fairseq_smlp.models import vocabulary


# ------------------------------------------------------------------ dictionary identity
def other_dictionary(size, changed):
    """tiny_dictionary(size) with the symbols at `changed` replaced."""
    d = tiny_dictionary(size)
    for i in changed:
        d.symbols[i] = f"other{i}"
    return d


def checkpoint_state(model, dictionary):
    """state["model"] as load_checkpoint_to_cpu returns it for a checkpoint trained on `dictionary`."""
    return vocabulary.attach({"model": model.state_dict(), "dictionary": vocabulary.fingerprint(dictionary)})["model"]


def test_same_dictionary_loads():
    model = build_tiny_smlp(vocab=40)
    model.load_state_dict(checkpoint_state(model, tiny_dictionary(40)))


@pytest.mark.parametrize("changed, expected", [
    ([4], "1 of 40 entries differ, first (checkpoint vs here): #4 'other4' vs 'w0'"),
    (range(4, 40), "36 of 40 entries differ, first (checkpoint vs here): #4 'other4' vs 'w0', #5 'other5' vs 'w1', #6 'other6' vs 'w2'"),
    ([39], "#39 'other39' vs 'w35'"),
])
def test_same_size_other_words_is_refused_with_the_first_differences(changed, expected):
    """The check compared sizes only: a data-bin with other words of the same size evaluated
    to a plausible, wrong perplexity."""
    model = build_tiny_smlp(vocab=40)
    with pytest.raises(ValueError, match="dictionary mismatch") as e:
        model.load_state_dict(checkpoint_state(model, other_dictionary(40, changed)))
    assert expected in str(e.value)


def test_other_size_names_the_extra_entries():
    model = build_tiny_smlp(vocab=40)
    state = checkpoint_state(model, tiny_dictionary(40))
    state.dictionary = vocabulary.fingerprint(tiny_dictionary(42))
    with pytest.raises(ValueError, match=r"2 of 42 entries differ, first \(checkpoint vs here\): #40 'w36' vs None"):
        model.load_state_dict(state)


def test_checkpoints_without_a_record_are_compared_by_size():
    model = build_tiny_smlp(vocab=40)
    model.load_state_dict(model.state_dict())  # no record, same size: loads (as before)
    bigger = build_tiny_smlp(vocab=48).state_dict()
    with pytest.raises(ValueError, match="the checkpoint's has 48 symbols, the data-bin's dict.txt has 40"):
        model.load_state_dict(bigger)


def test_the_record_survives_pickling():
    """fairseq broadcasts the loaded state from rank 0 to the others by pickling it."""
    state = checkpoint_state(build_tiny_smlp(vocab=40), tiny_dictionary(40))
    again = pickle.loads(pickle.dumps(state))
    assert again.dictionary == state.dictionary and set(again) == set(state)


def test_fingerprint_is_by_content():
    a, b = vocabulary.fingerprint(tiny_dictionary(40)), vocabulary.fingerprint(tiny_dictionary(40))
    assert a == b and a["size"] == 40
    assert vocabulary.fingerprint(other_dictionary(40, [7]))["sha256"] != a["sha256"]


# ------------------------------------------------------------------ reshard: what it keeps
def adam_state(n_params, shapes=None):
    shapes = shapes or [(3,)] * n_params
    return {"state": {i: {"step": torch.tensor(2.0), "exp_avg": torch.ones(s), "exp_avg_sq": torch.ones(s)} for i, s in enumerate(shapes)},
            "param_groups": [{"lr": 0.1, "params": list(range(n_params))}], "loss_scale": 8.0}


@pytest.mark.parametrize("optim, reason", [
    (adam_state(4), None),
    (adam_state(1), "one flattened fp32 vector for all parameters (--fp16/--bf16 master weights without --fp16-no-flatten-grads)"),
    ({"state": {}, "param_groups": [{"params": [0, 1]}, {"params": [2, 3]}]}, "it has 2 parameter groups (one expected)"),
    (adam_state(3), "it holds 3 parameters, the model 4"),
    ({"something": "else"}, "it is not a torch optimizer state"),
])
def test_why_optimizer_state_cannot_be_kept(optim, reason):
    got = reshard.why_not_per_parameter([optim], ["a", "b", "c", "d"])
    assert (got is None) if reason is None else (reason in got), got


def test_parameter_order_of_a_tied_model_counts_the_tied_weight_once():
    """A single-process checkpoint has no parameter list: it comes from the model rebuilt on
    the meta device; the tied output projection is not a parameter of its own."""
    from fairseq_smlp.dry_run import parse_fairseq_args

    cfg = parse_fairseq_args(["DATA", "--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny", "--tokens-per-sample", "16",
                              "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16"])
    from omegaconf import OmegaConf

    from fairseq_smlp.models.factory import build_from_config

    model = build_from_config(cfg, 40)
    state = {"cfg": OmegaConf.to_container(cfg, resolve=True), "model": model.state_dict()}
    names = reshard.parameter_names(state)
    assert names == [n for n, _ in model.named_parameters()]
    assert "decoder.output_projection.weight" in state["model"] and "decoder.output_projection.weight" not in names


def states_at(updates):
    return [{"optimizer_history": [{"num_updates": u}], "expert_parallel": {"world_size": len(updates), "rank": r}}
            for r, u in enumerate(updates)]


def test_rank_files_of_different_updates_are_refused():
    with pytest.raises(SystemExit) as e:
        reshard.check_one_save(["last-rank-0.pt", "last-rank-1.pt"], states_at([40, 38]))
    assert "saved at different updates" in str(e.value) and "last-rank-0.pt: update 40, last-rank-1.pt: update 38" in str(e.value)
    reshard.check_one_save(["a", "b"], states_at([40, 40]))


def test_rank_files_of_one_save_are_all_ranks_once():
    states = states_at([7, 7])
    states[1]["expert_parallel"]["rank"] = 0
    with pytest.raises(SystemExit, match=r"2 rank files \(ranks 0..1\); given: a \(rank 0\), b \(rank 0\)"):
        reshard.check_one_save(["a", "b"], states)
