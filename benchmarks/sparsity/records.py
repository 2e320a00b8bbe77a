"""The study's raw records: one JSON record per line in DIR/raw/NAME.jsonl, appended as a run goes
(a killed run loses at most the model in progress; a rerun skips every model already done)."""
import json
from pathlib import Path

from fairseq_smlp.atomic_write import atomic_write_text


def output_file(prefix: Path, suffix: str) -> Path:
    """PREFIX + suffix (not Path.with_suffix: a prefix like runs/lr_0.002 has a dot of its own)."""
    return Path(f"{prefix}{suffix}")


def records_file(prefix: Path) -> Path:
    """The raw records of PREFIX = DIR/NAME: DIR/raw/NAME.jsonl, next to the rendered PREFIX.json,
    PREFIX.md and PREFIX_*.png."""
    prefix = Path(prefix)
    return prefix.parent / "raw" / f"{prefix.name}.jsonl"


def read_records(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_models(records):
    return {r["model"] for r in records if r["kind"] == "done"}


def drop_unfinished(path: Path) -> None:
    """A model killed mid-run is trained again from the start: forget its partial records."""
    records = read_records(path)
    done = finished_models(records)
    kept = [r for r in records if r["kind"] == "meta" or r.get("model") in done]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def by_model(records):
    """model -> {"start": {...}, "train": [...], "eval": [...], "done": {...}}."""
    models = {}
    for r in records:
        if r["kind"] == "meta":
            continue
        m = models.setdefault(r["model"], {"train": [], "eval": []})
        if r["kind"] in ("train", "eval"):
            m[r["kind"]].append(r)
        else:
            m[r["kind"]] = r
    return {k: v for k, v in models.items() if "done" in v}


def with_unfinished(records):
    """by_model, plus the models that did not finish (still training, or stopped), cut at their
    last record: marked "partial", their "done" taken from their last training interval."""
    models = by_model(records)
    unfinished = {r["model"]: {"start": r, "train": [], "eval": [], "partial": True}
                  for r in records if r["kind"] == "start" and r["model"] not in models}
    for r in records:
        if r["kind"] in ("train", "eval") and r["model"] in unfinished:
            unfinished[r["model"]][r["kind"]].append(r)
    for m in unfinished.values():
        if m["train"]:
            m["done"] = {"tokens": m["train"][-1]["tokens"], "seconds": m["train"][-1]["seconds"]}
    return {**models, **{k: v for k, v in unfinished.items() if v["train"]}}



def cut_at(models: dict, until_tokens: int, tokens_per_update: int) -> dict:
    """Every model as it was after `until_tokens` training tokens (one update of slack: two runs
    with different evaluation schedules cross a threshold one update apart)."""
    limit = until_tokens + tokens_per_update
    cut = {}
    for name, m in models.items():
        train = [r for r in m["train"] if r["tokens"] <= limit]
        evals = [r for r in m["eval"] if r["tokens"] <= limit]
        if train:
            cut[name] = {**m, "train": train, "eval": evals,
                         "done": {"tokens": train[-1]["tokens"], "seconds": train[-1]["seconds"]}}
    return cut

