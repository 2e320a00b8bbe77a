"""Bad numbers: the one table of ranges (fairseq_smlp/validation.py) covers every numeric flag,
each range is enforced with a message naming the flag, the value and the range, and every
command checks its numbers through it (fairseq commands in call_main, models in build_model,
our own commands after argparse). End-to-end cases through fairseq-train are in
test_bad_input.py."""
import argparse
import dataclasses
import math
import typing

import pytest

import fairseq_smlp  # noqa: F401  (registers the plugin)
from fairseq_smlp import validation
from fairseq_smlp.validation import FLAGS, FlagError, check_config, check_value


# ------------------------------------------------------------------ the table covers every flag
def numeric_fields(dataclass):
    """Fields typed int / float / Optional[...] / List[...] of those."""
    out = []
    for f in dataclasses.fields(dataclass):
        types = {f.type, *typing.get_args(f.type)}
        if types & {int, float} or any(set(typing.get_args(t)) & {int, float} for t in types):
            out.append(f.name)
    return out


def plugin_dataclasses():
    from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyConfig
    from fairseq_smlp.models.moe_transformer_lm import MoETransformerLanguageModelConfig
    from fairseq_smlp.models.smlp_lm import SmlpConfig

    return [SmlpConfig, MoETransformerLanguageModelConfig, MoECrossEntropyConfig]


@pytest.mark.parametrize("dataclass", plugin_dataclasses(), ids=lambda d: d.__name__)
def test_every_numeric_field_of_our_dataclasses_has_a_range(dataclass):
    missing = [validation.flag_of(n) for n in numeric_fields(dataclass) if validation.flag_of(n) not in FLAGS]
    assert numeric_fields(dataclass) and not missing


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def tool_parsers(monkeypatch):
    """{tool: its argparse parser}, captured at its parse call."""
    from data_prep import paper_corpus, small_corpus
    from fairseq_smlp import dry_run, flops, quickstart
    from fairseq_smlp.checkpoints import reshard
    from fairseq_smlp.distributed import launch_cpu
    from fairseq_smlp.eval import zeroshot

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    calls = {"quickstart": lambda: quickstart.parse_args([]), "reshard": lambda: reshard.main([]),
             "launch_cpu": lambda: launch_cpu.main(["--", "true"]), "flops": lambda: flops.cli_main([]),
             "dry_run": lambda: dry_run.main([]), "small_corpus": lambda: small_corpus.cli_main([]),
             "paper_corpus": lambda: paper_corpus.cli_main([]), "zeroshot": lambda: zeroshot.cli_main([])}
    parsers = {}
    for tool, call in calls.items():
        with pytest.raises(_Parsed) as e:
            call()
        parsers[tool] = e.value.parser
    return parsers


def numeric_options(parser):
    """Option strings of the int/float options of a parser and its subcommands."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += numeric_options(sub)
        elif action.type in (int, float) and action.option_strings:
            out.append(action.option_strings[-1])
    return out


def test_every_numeric_option_of_our_commands_has_a_range(monkeypatch):
    parsers = tool_parsers(monkeypatch)
    options = {tool: numeric_options(p) for tool, p in parsers.items()}
    assert all(options.values()), options  # each tool has numeric options: the capture worked
    missing = {tool: [o for o in opts if o not in FLAGS] for tool, opts in options.items()}
    assert not any(missing.values()), missing


# ------------------------------------------------------------------ each range is enforced
def bad_values(rng):
    """Values just outside a range (and the non-finite ones), skipping its special values."""
    candidates = [math.nan, math.inf, -math.inf]
    if rng.low is not None:
        candidates += [rng.low] if rng.low_open else [rng.low - 1, rng.low - 2]
    if rng.high is not None:
        candidates += [rng.high] if rng.high_open else [rng.high + 1]
    if rng.integer:
        candidates.append((rng.low or 0) + 0.5)
    return [v for v in candidates if not rng.allows(v)]


def good_value(rng):
    low = rng.low if rng.low is not None else 0
    for v in (low, low + 1, low + 0.5, 0, 1, -1):
        if rng.allows(v) and not any(v == s for s, _ in rng.special):
            return v
    raise AssertionError(rng)


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_every_range_refuses_what_is_outside_it(flag):
    rng = FLAGS[flag]
    value = good_value(rng)
    check_value(flag, f"({value}, {value})" if flag == "--adam-betas" else value)
    assert bad_values(rng)
    for bad in bad_values(rng):
        if flag == "--adam-betas" and not math.isfinite(bad):
            continue  # a string fairseq eval()s: 'nan' is no literal (refused as "not a pair", below)
        given = f"({value}, {bad})" if flag == "--adam-betas" else bad
        with pytest.raises(FlagError) as e:
            check_value(flag, given)
        assert str(e.value).startswith(f"{flag} must be {rng.describe(bad)}, got ") and str(bad) in str(e.value), str(e.value)
    for special, meaning in rng.special:
        check_value(flag, special)
        assert meaning in rng.describe()


@pytest.mark.parametrize("flag, value, message", [
    ("--dropout", 1.5, "--dropout must be in [0, 1), got 1.5"),
    ("--decoder-layers", 0, "--decoder-layers must be >= 1, got 0"),
    ("--decoder-layers", 2.5, "--decoder-layers must be an integer >= 1, got 2.5"),
    ("--lr", [math.nan], "--lr must be a finite number > 0, got [nan]"),
    ("--lr", [0.1, -0.1], "--lr must be > 0, got -0.1 (in [0.1, -0.1])"),
    ("--update-freq", [1, 0], "--update-freq must be >= 1, got 0 (in [1, 0])"),
    ("--keep-last-epochs", -2, "--keep-last-epochs must be >= 0 or -1 (no limit), got -2"),
    ("--max-update", -5, "--max-update must be >= 0 (0: no limit), got -5"),
    ("--partial-prefix-ratio", 1.0, "--partial-prefix-ratio must be in (0, 1), got 1.0"),
    ("--adam-betas", "(0.9, 1.0)", "--adam-betas must be in [0, 1), got 1.0 (in (0.9, 1.0))"),
    ("--adam-betas", "0.9", "--adam-betas must be a pair like '(0.9, 0.98)', got '0.9'"),
    ("--moe-train-capacity-factor", math.inf, "--moe-train-capacity-factor must be a finite number (<= 0: no limit), got inf"),
    ("--minutes", 0, "--minutes must be > 0, got 0"),
    ("--port", 70000, "--port must be in [0, 65535] (0: a free port), got 70000"),
    ("--stop-time-hours", True, "--stop-time-hours must be a number >= 0 (0: no limit), got True"),
])
def test_messages_name_flag_value_and_range(flag, value, message):
    with pytest.raises(FlagError) as e:
        check_value(flag, value)
    assert str(e.value) == message


def test_stop_time_is_passed_unrounded():
    """--minutes 0.001 became '--stop-time-hours 0.0000', which fairseq reads as no limit."""
    for minutes in (0.001, 1e-6, 12.0):
        assert float(validation.hours_flag(minutes)) == minutes / 60 > 0
    with pytest.raises(FlagError, match="--minutes must be > 0"):
        validation.hours_flag(0)


# ------------------------------------------------------------------ fairseq configs
def train_cfg(*argv):
    from fairseq_smlp.dry_run import parse_fairseq_args

    return parse_fairseq_args(["DATA", "--task", "smlp_language_modeling", *argv])


def eval_cfg(*argv):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_eval_lm_parser(), ["DATA", "--task", "smlp_language_modeling", "--path", "x.pt", *argv])
    return convert_namespace_to_omegaconf(args)


def smallest_and_largest_archs():
    """{family}_tiny and the family's largest size (9b, else large): the sizes between only
    change numbers within those two."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    from fairseq_smlp.flops import FAMILIES

    out = []
    for family in FAMILIES:
        largest = next(f"{family}_{s}" for s in ("9b", "large") if f"{family}_{s}" in ARCH_MODEL_REGISTRY)
        out += [f"{family}_tiny", largest]
    return out


@pytest.mark.parametrize("arch", smallest_and_largest_archs())
def test_defaults_of_every_arch_pass(arch):
    check_config(train_cfg("--arch", arch))


def test_defaults_of_eval_lm_pass():
    check_config(eval_cfg())


@pytest.mark.parametrize("argv, message", [
    (["--arch", "smlp_lm_tiny", "--tokens-per-sample", "64", "--max-tokens", "32"],
     "--max-tokens 32 is smaller than --tokens-per-sample 64"),
    (["--arch", "smlp_lm_tiny", "--tokens-per-sample", "64", "--max-tokens", "64", "--max-tokens-valid", "63"],
     "--max-tokens-valid 63 is smaller than --tokens-per-sample 64"),
    (["--arch", "smlp_lm_tiny", "--sparse-every", "5"], "--sparse-every 5 with --decoder-layers 4 makes no block sparse"),
    (["--arch", "switch_lm_tiny", "--moe-freq", "5"], "--moe-freq 5 with --decoder-layers 4 gives no MoE layer"),
    (["--arch", "smlp_lm_tiny", "--decoder-ffn-embed-dim", "511"], "--decoder-ffn-embed-dim 511 must be even"),
    (["--arch", "transformer_lm_tiny", "--decoder-attention-heads", "3"], "--decoder-attention-heads 3 must divide --decoder-embed-dim 128"),
    (["--arch", "smlp_lm_tiny", "--distributed-world-size", "2", "--distributed-rank", "2"],
     "--distributed-rank 2 must be < --distributed-world-size 2"),
    (["--arch", "smlp_lm_tiny", "--decoder-layers", "0"], "--decoder-layers must be >= 1, got 0"),
    (["--arch", "gmlp_lm_tiny", "--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--arch", "hash_lm_tiny", "--hash-seed", "-1"], "--hash-seed must be in [0, 4294967295], got -1"),
    (["--arch", "smlp_lm_tiny", "--criterion", "moe_cross_entropy", "--moe-aux-loss-weight", "-0.01"],
     "--moe-aux-loss-weight must be >= 0, got -0.01"),
    (["--arch", "smlp_lm_tiny", "--optimizer", "adam", "--adam-eps", "0"], "--adam-eps must be > 0, got 0.0"),
    (["--arch", "smlp_lm_tiny", "--clip-norm", "nan"], "--clip-norm must be a finite number >= 0"),
])
def test_training_flags_and_their_relations(argv, message):
    with pytest.raises(FlagError) as e:
        check_config(train_cfg(*argv))
    assert message in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--tokens-per-sample", "64", "--context-window", "64"], "--context-window 64 must be smaller than --tokens-per-sample 64"),
    (["--tokens-per-sample", "64", "--max-tokens", "32"], "--max-tokens 32 is smaller than --tokens-per-sample 64"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_evaluation_flags(argv, message):
    with pytest.raises(FlagError) as e:
        check_config(eval_cfg(*argv))
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(decoder_layers=0), "--decoder-layers must be >= 1, got 0"),
    (dict(dropout=-0.1), "--dropout must be in [0, 1), got -0.1"),
    (dict(smoe_experts=0), "--smoe-experts must be >= 1, got 0"),
    (dict(spatial_init_eps=math.nan), "--spatial-init-eps must be a finite number >= 0"),
])
def test_models_check_their_config_in_build_model(overrides, message):
    """The Python API path (no fairseq command): build_model checks the same table."""
    from conftest import build_tiny_smlp

    with pytest.raises(FlagError) as e:
        build_tiny_smlp(**overrides)
    assert message in str(e.value)


# ------------------------------------------------------------------ our commands' own options
def first_bad(flag):
    bad = [v for v in bad_values(FLAGS[flag]) if math.isfinite(v)]
    value = bad[0]
    return str(int(value)) if FLAGS[flag].integer else str(value)


def command_cases(tmp):
    """(tool, flag, argv builder) for every numeric option of every command."""
    out = str(tmp / "out")
    builders = {
        "quickstart": lambda f, v: ("fairseq_smlp.quickstart", "parse_args", [f, v]),
        "reshard": lambda f, v: ("fairseq_smlp.checkpoints.reshard", "main", ["reshard", "x.pt", "--out", out, "--to-world-size", "1", f, v]),
        "launch_cpu": lambda f, v: ("fairseq_smlp.distributed.launch_cpu", "main", ["--nprocs", "1", f, v, "--", "true"]),
        "flops": lambda f, v: ("fairseq_smlp.flops", "cli_main", ["--arch", "smlp_lm_tiny", f, v]),
        "dry_run": lambda f, v: ("fairseq_smlp.dry_run", "main", ["--world-size", "1", f, v, "--", "DATA"]),
        "small_corpus": lambda f, v: ("data_prep.small_corpus", "cli_main", ["--corpus", "ptb", "--bpe", "sentencepiece", "--out-dir", out, f, v]),
        "paper_corpus": lambda f, v: ("data_prep.paper_corpus", "cli_main", ["--input", "a=b", "--bpe", "sentencepiece", "--out-dir", out, f, v]),
        "zeroshot": lambda f, v: ("fairseq_smlp.eval.zeroshot", "cli_main", ["--path", "x.pt", f, v]),
    }
    return builders


def test_every_numeric_option_of_our_commands_is_checked(monkeypatch, tmp_path, capsys):
    """Each command, each numeric option, a value just outside its range: an argparse-style
    error naming the flag, and nothing written."""
    import importlib

    parsers = tool_parsers(monkeypatch)
    options = {tool: numeric_options(p) for tool, p in parsers.items()}
    monkeypatch.undo()
    builders = command_cases(tmp_path)
    checked = 0
    for tool, flags in options.items():
        for flag in flags:
            module, function, argv = builders[tool](flag, first_bad(flag))
            with pytest.raises(SystemExit) as e:
                getattr(importlib.import_module(module), function)(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"{flag} must be " in err, (tool, flag, err[-500:])
            checked += 1
    assert checked >= 25 and not any(tmp_path.iterdir())
