"""Loaders for the zero-shot tasks, each reading its public file format.

Every loader turns a file into a list of ``Example``: one (context, continuation) pair per
candidate answer plus the index of the correct one. How a task is phrased as text (the
prompt convention) lives here; how the text is scored lives in scoring.py.

Conventions follow GPT-3 (Brown et al. 2020) and fairseq's few-shot evaluation of the MoE
work (Artetxe et al. 2021); each one is stated in one comment line in its loader.

Any other multiple-choice set comes in the generic JSON-lines schema of
``load_multiple_choice`` (``--task-file NAME=PATH``); every built-in task is a reader of
its public format that produces the same Examples, and ``export`` writes a built-in task
in the generic schema:

    python -m fairseq_smlp.eval.zeroshot_tasks export copa copa.validation.jsonl copa.mc.jsonl
"""
import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .. import text_files
from ..text_files import TextFileError


class TaskFileError(TextFileError):
    """A malformed task file: the message starts with 'file:line:' ('file:' when the
    problem is the whole file)."""

    def __init__(self, path, lineno: Optional[int], message: str):
        super().__init__(path, lineno, message)


@dataclass
class Example:
    """One multiple-choice question: candidate i is ``contexts[i] + continuations[i]``.

    Only the continuation is scored. ``label`` is the index of the correct candidate
    (-1 when no candidate is correct, possible in ReCoRD). ReCoRD also keeps the candidate
    entity texts (``choices``) and the gold answer texts (``answers``) for EM / F1.
    """

    contexts: List[str]
    continuations: List[str]
    label: int
    choices: List[str] = field(default_factory=list)
    answers: List[str] = field(default_factory=list)
    lineno: int = 0  # line of the task file it came from (0: not from a file)

    def __post_init__(self):
        assert len(self.contexts) == len(self.continuations) > 0

    def to_record(self) -> dict:
        """This example in the generic schema of load_multiple_choice."""
        if len(set(self.contexts)) == 1:
            return {"context": self.contexts[0], "choices": list(self.continuations), "label": self.label}
        if len(set(self.continuations)) == 1:
            return {"contexts": list(self.contexts), "continuation": self.continuations[0], "label": self.label}
        raise ValueError("contexts and continuations both differ between candidates: no generic form")


# ----------------------------------------------------------------------------- file readers


def read_text(path) -> str:
    """The whole file as text; an error naming the file (and the line and byte offset of
    the first byte that is not UTF-8) if it is missing, not UTF-8 or empty (the reader
    data_prep uses too: fairseq_smlp/text_files.py)."""
    try:
        return text_files.read_text(path, what="examples")
    except TextFileError as e:
        raise TaskFileError(e.path, e.lineno, e.detail) from None


def nonempty(examples: List[Example], path) -> List[Example]:
    if not examples:
        raise TaskFileError(path, None, "no examples in the file")
    return examples


def read_jsonl(path) -> Iterator[Tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file."""
    # split on \n only: JSON strings may hold U+2028 and other characters splitlines() cuts at
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(path, lineno, f"not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaskFileError(path, lineno, "expected a JSON object")
        yield lineno, obj


def get(obj: dict, key: str, path, lineno: int, kind=str):
    """obj[key], checked to be of type ``kind``; a clear error otherwise."""
    if key not in obj:
        raise TaskFileError(path, lineno, f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise TaskFileError(path, lineno, f"field '{key}' should be {name}, got {value!r}")
    return value


def get_label(obj: dict, key: str, path, lineno: int, allowed: Dict) -> int:
    """Map a label value (int or string, e.g. 1 or "2") to a 0-based candidate index."""
    value = get(obj, key, path, lineno, (int, str))
    if value not in allowed:
        raise TaskFileError(path, lineno, f"field '{key}' should be one of {list(allowed)}, got {value!r}")
    return allowed[value]


def labels(*values) -> Dict:
    """{value: index} accepting both the int and the string spelling of each value."""
    return {**{v: i for i, v in enumerate(values)}, **{str(v): i for i, v in enumerate(values)}}


# ----------------------------------------------------------------------------- tasks


def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def load_copa(path) -> List[Example]:
    """COPA jsonl: premise, choice1, choice2, question ("cause"/"effect"), label (0/1)."""
    connective = {"cause": " because", "effect": " therefore"}
    examples = []
    for lineno, obj in read_jsonl(path):
        premise = get(obj, "premise", path, lineno).strip()
        question = get(obj, "question", path, lineno)
        if question not in connective:
            raise TaskFileError(path, lineno, f"field 'question' should be cause/effect, got {question!r}")
        choices = [get(obj, k, path, lineno).strip() for k in ("choice1", "choice2")]
        # COPA: premise minus its final period + " because"/" therefore"; score " " + alternative with its
        # first letter lower-cased.
        context = (premise[:-1] if premise.endswith(".") else premise) + connective[question]
        examples.append(Example(
            contexts=[context] * 2,
            continuations=[" " + lower_first(c) for c in choices],
            label=get_label(obj, "label", path, lineno, labels(0, 1)),
            lineno=lineno,
        ))
    return nonempty(examples, path)


def load_piqa(path) -> List[Example]:
    """PIQA jsonl: goal, sol1, sol2, label (0/1)."""
    examples = []
    for lineno, obj in read_jsonl(path):
        goal = get(obj, "goal", path, lineno).strip()
        sols = [get(obj, k, path, lineno).strip() for k in ("sol1", "sol2")]
        # PIQA: context = goal, score " " + solution.
        examples.append(Example(
            contexts=[goal] * 2,
            continuations=[" " + s for s in sols],
            label=get_label(obj, "label", path, lineno, labels(0, 1)),
            lineno=lineno,
        ))
    return nonempty(examples, path)


STORYCLOZE_COLUMNS = [f"InputSentence{i}" for i in range(1, 5)] + [
    "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def load_storycloze(path) -> List[Example]:
    """StoryCloze 2016 csv: InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1/2,
    AnswerRightEnding (1/2)."""
    examples = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    missing = [c for c in STORYCLOZE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TaskFileError(path, 1, f"csv header lacks column(s) {missing}")
    for row in reader:
        lineno = reader.line_num
        if None in row or any(row[c] is None for c in STORYCLOZE_COLUMNS):
            raise TaskFileError(path, lineno, f"expected {len(reader.fieldnames)} columns")
        story = " ".join(row[f"InputSentence{i}"].strip() for i in range(1, 5))
        endings = [row[f"RandomFifthSentenceQuiz{i}"].strip() for i in (1, 2)]
        # StoryCloze: context = the four story sentences, score " " + fifth-sentence ending.
        examples.append(Example(
            contexts=[story] * 2,
            continuations=[" " + e for e in endings],
            label=get_label(row, "AnswerRightEnding", path, lineno, {"1": 0, "2": 1}),
            lineno=lineno,
        ))
    return nonempty(examples, path)


def load_winogrande(path) -> List[Example]:
    """Winogrande jsonl: sentence (one "_" blank), option1, option2, answer ("1"/"2")."""
    examples = []
    for lineno, obj in read_jsonl(path):
        sentence = get(obj, "sentence", path, lineno)
        if "_" not in sentence:
            raise TaskFileError(path, lineno, "field 'sentence' has no '_' blank")
        blank = sentence.index("_")
        options = [get(obj, k, path, lineno).strip() for k in ("option1", "option2")]
        # Winogrande, partial scoring: context = text before "_" + option, score the shared suffix after the blank.
        examples.append(Example(
            contexts=[sentence[:blank] + o for o in options],
            continuations=[" " + sentence[blank + 1:].strip()] * 2,
            label=get_label(obj, "answer", path, lineno, labels(1, 2)),
            lineno=lineno,
        ))
    return nonempty(examples, path)


def clean_hellaswag(text: str) -> str:
    """WikiHow contexts carry markers like " [title]" and "[header]"; remove them."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(" {2,}", " ", text).strip()


def load_hellaswag(path) -> List[Example]:
    """HellaSwag jsonl: ctx_a, ctx_b, endings (4), label ("0".."3"); ``ctx`` where ctx_a and
    ctx_b are absent.

    Context = ctx_a + " " + ctx_b with its first letter upper-cased (the rest kept), then
    cleaned of WikiHow markers (clean_hellaswag): lm-evaluation-harness's hellaswag
    context without its "activity_label: " prefix. Candidate i = " " + cleaned ending i.
    """
    examples = []
    for lineno, obj in read_jsonl(path):
        if "ctx_a" in obj and "ctx_b" in obj:
            ctx_b = get(obj, "ctx_b", path, lineno).strip()
            context = get(obj, "ctx_a", path, lineno).strip() + " " + ctx_b[:1].upper() + ctx_b[1:]
        else:
            context = get(obj, "ctx", path, lineno)
        endings = get(obj, "endings", path, lineno, list)
        if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise TaskFileError(path, lineno, "field 'endings' should be a list of 4 strings")
        # HellaSwag: context -> " " + ending, both cleaned; scored by mean log-prob per ending token.
        examples.append(Example(
            contexts=[clean_hellaswag(context)] * 4,
            continuations=[" " + clean_hellaswag(e) for e in endings],
            label=get_label(obj, "label", path, lineno, labels(0, 1, 2, 3)),
            lineno=lineno,
        ))
    return nonempty(examples, path)


def record_entities(passage: dict, path, lineno: int) -> List[str]:
    """Distinct entity strings of a ReCoRD passage, in order; spans are [start, end] inclusive."""
    text = get(passage, "text", path, lineno)
    entities = []
    for span in get(passage, "entities", path, lineno, list):
        if not isinstance(span, dict):
            raise TaskFileError(path, lineno, f"entity span should be an object, got {span!r}")
        start, end = get(span, "start", path, lineno, int), get(span, "end", path, lineno, int)
        if not 0 <= start <= end < len(text):
            raise TaskFileError(path, lineno, f"entity span [{start}, {end}] outside the passage")
        entity = text[start:end + 1]
        if entity not in entities:
            entities.append(entity)
    if not entities:
        raise TaskFileError(path, lineno, "passage has no entities")
    return entities


def load_record(path) -> List[Example]:
    """ReCoRD jsonl (SuperGLUE): passage {text, entities [{start, end}]}, qas [{query, answers}].

    One Example per query; its candidates are the passage's distinct entities.
    """
    examples = []
    for lineno, obj in read_jsonl(path):
        passage = get(obj, "passage", path, lineno, dict)
        entities = record_entities(passage, path, lineno)
        # Highlights are "@highlight" lines under the article; keep them as "- " bullet lines.
        context = passage["text"].strip().replace("\n@highlight\n", "\n- ")
        for qa in get(obj, "qas", path, lineno, list):
            if not isinstance(qa, dict):
                raise TaskFileError(path, lineno, f"qas entry should be an object, got {qa!r}")
            query = get(qa, "query", path, lineno)
            if "@placeholder" not in query:
                raise TaskFileError(path, lineno, "query has no '@placeholder'")
            answers = [get(a, "text", path, lineno) for a in get(qa, "answers", path, lineno, list)]
            # ReCoRD: context = passage, score the query with each candidate entity substituted for @placeholder.
            examples.append(Example(
                contexts=[context] * len(entities),
                continuations=["\n- " + query.replace("@placeholder", e) for e in entities],
                label=next((i for i, e in enumerate(entities) if e in answers), -1),
                choices=list(entities),
                answers=answers,
                lineno=lineno,
            ))
    return nonempty(examples, path)


def load_multiple_choice(path) -> List[Example]:
    """The generic multiple-choice schema (``--task-file NAME=PATH``): JSON lines, one
    question per line, in one of two forms:

        {"context": "The man turned on the faucet therefore",
         "choices": [" the toilet filled with water.", " water flowed from the spout."],
         "label": 1}
        {"contexts": ["Sarah was a better surgeon than Maria so Sarah",
                      "Sarah was a better surgeon than Maria so Maria"],
         "continuation": " always got the easier cases.", "label": 1}

    Full scoring: candidate i = context + choices[i], and choices[i] is scored. Partial
    scoring (Winogrande's): candidate i = contexts[i] + continuation, and the shared
    continuation is scored. Texts are joined exactly as written (put the space in the
    choice: " Paris"). Two or more choices; label = 0-based index of the right one. Other
    fields (an "id") are ignored.
    """
    examples = []
    for lineno, obj in read_jsonl(path):
        if ("context" in obj) == ("contexts" in obj):
            raise TaskFileError(path, lineno, "expected either 'context' + 'choices' (full scoring) "
                                              "or 'contexts' + 'continuation' (partial scoring)")
        if "context" in obj:
            context = get(obj, "context", path, lineno)
            choices = get_strings(obj, "choices", path, lineno)
            contexts, continuations = [context] * len(choices), choices
        else:
            contexts = get_strings(obj, "contexts", path, lineno)
            continuations = [get(obj, "continuation", path, lineno)] * len(contexts)
        label = get(obj, "label", path, lineno, int)
        if not 0 <= label < len(contexts):
            raise TaskFileError(
                path, lineno, f"field 'label' should be a choice index 0..{len(contexts) - 1}, got {label}"
            )
        examples.append(Example(contexts, continuations, label, lineno=lineno))
    return nonempty(examples, path)


def get_strings(obj: dict, key: str, path, lineno: int) -> List[str]:
    """obj[key] checked to be a list of two or more strings."""
    value = get(obj, key, path, lineno, list)
    if len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise TaskFileError(path, lineno, f"field '{key}' should be a list of 2 or more strings, got {value!r}")
    return value


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """How to find, load and score one task."""

    name: str
    files: Tuple[str, ...]  # file names tried in --data-dir, first found wins
    load: Callable[[Path], List[Example]]
    length_normalized: bool  # True: `accuracy` chooses by mean log-prob per continuation token
    scoring: str  # the convention, written to the results JSON


TASKS: Dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("copa", ("copa.validation.jsonl", "COPA/val.jsonl"), load_copa, False,
             "sum log-prob of ' ' + lower-cased alternative given premise (final period removed) "
             "+ ' because'/' therefore'"),
    TaskSpec("piqa", ("piqa.validation.jsonl", "piqa.valid.jsonl"), load_piqa, False,
             "sum log-prob of ' ' + solution given goal"),
    TaskSpec("storycloze", ("storycloze.validation.csv", "cloze_test_val__spring2016.csv"), load_storycloze, False,
             "sum log-prob of ' ' + ending given the four story sentences"),
    TaskSpec("winogrande", ("winogrande.validation.jsonl", "winogrande.dev.jsonl"), load_winogrande, False,
             "partial scoring: sum log-prob of the suffix after '_' given prefix + option"),
    TaskSpec("hellaswag", ("hellaswag.validation.jsonl", "hellaswag_val.jsonl"), load_hellaswag, True,
             "mean log-prob per token of ' ' + ending given the cleaned context"),
    TaskSpec("record", ("record.validation.jsonl", "ReCoRD/val.jsonl"), load_record, False,
             "sum log-prob of the query with each entity in @placeholder given the passage; "
             "accuracy = exact match of the chosen entity with a gold answer"),
]}


GENERIC_SCORING = "sum log-prob of each choice (or of the shared continuation) as written in the file"


def task_from_file(argument: str) -> Tuple[TaskSpec, Path]:
    """--task-file NAME=PATH -> (a TaskSpec in the generic schema, PATH)."""
    name, sep, path = argument.partition("=")
    name = name.strip().lower()
    if not sep or not name or not path:
        raise ValueError(f"--task-file {argument!r}: expected NAME=PATH")
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"--task-file {argument!r}: NAME may hold letters, digits, '_', '-' and '.' only")
    return TaskSpec(name, (), load_multiple_choice, False, GENERIC_SCORING), Path(path)


def find_task_file(task: TaskSpec, data_dir) -> Path:
    """The first of the task's known file names present in data_dir."""
    for name in task.files:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise FileNotFoundError(
        f"--tasks {task.name}: none of {list(task.files)} found in --data-dir {data_dir}")


def export_main(argv=None):
    """Write a built-in task file in the generic schema (--task-file reads it back)."""
    p = argparse.ArgumentParser(prog="python -m fairseq_smlp.eval.zeroshot_tasks export",
                                description=export_main.__doc__)
    p.add_argument("task", choices=[t for t in TASKS if t != "record"])
    p.add_argument("input", help="the task file in its public format")
    p.add_argument("output", help="JSON-lines file to write")
    args = p.parse_args(argv)
    try:
        examples = TASKS[args.task].load(args.input)
    except TaskFileError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    Path(args.output).write_text("".join(json.dumps(ex.to_record()) + "\n" for ex in examples))
    print(f"{len(examples)} examples -> {args.output}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["export"]:
        sys.exit("usage: python -m fairseq_smlp.eval.zeroshot_tasks export TASK INPUT OUTPUT")
    export_main(sys.argv[2:])
