"""README.md and docs/ stay true: the README's figures equal the results files they come from,
its links resolve, it stays short and keeps the commands that CI and the quickstart run."""
import json
import re

import pytest

from conftest import REPO

ROOT = REPO
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS + [ROOT / "benchmarks" / "README.md"]
FIGURES_MARKER = re.compile(r"<!-- figures: (\S+) -->")


def _readme_lines():
    return README.read_text(encoding="utf-8").splitlines()


def _figure_tables():
    """(results file, [row cells]) for every table announced by a `<!-- figures: FILE -->` line."""
    lines, tables = _readme_lines(), []
    for i, line in enumerate(lines):
        m = FIGURES_MARKER.search(line)
        if not m:
            continue
        rows, j = [], i + 1
        while j < len(lines) and lines[j].startswith("|"):
            rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
            j += 1
        tables.append((m.group(1), rows))
    return tables


def _number(cell):
    m = re.search(r"-?[\d,]*\.?\d+", cell)
    return None if m is None else float(m.group(0).replace(",", ""))


def _decimals(cell):
    m = re.search(r"\.(\d+)", cell)
    return len(m.group(1)) if m else 0


def test_readme_is_short():
    assert len(_readme_lines()) <= 260


def test_readme_keeps_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8") if (ROOT / ".ci" / "run").exists() else ""
    assert "python -m pytest -q tests" in text
    if ci:
        assert "python -m pytest -q tests" in ci
    assert "fairseq-smlp-quickstart" in text
    install = 'pip install torch==2.13.0 numpy cython && pip install --no-build-isolation -e ".[test]"'
    assert f"{install} && fairseq-smlp-quickstart" in text
    assert f"{install} && python -m pytest -q tests" in text
    assert "<!-- quickstart:begin -->" in text and "<!-- quickstart:end -->" in text


def test_headline_table_matches_its_results_file():
    tables = _figure_tables()
    assert tables, "README.md has no <!-- figures: FILE --> table"
    for source, rows in tables:
        path = ROOT / source
        assert path.exists(), source
        data = json.loads(path.read_text(encoding="utf-8"))
        header, body = rows[0], [r for r in rows[2:]]
        assert header[:5] == ["model", "arch", "tokens/s", "final valid ppl", "smlp_top1's time to this ppl"], header
        summary = data["summary"]["rows"]
        seen = set()
        for cells in body:
            key = re.search(r"`([^`]+)`", cells[0]).group(1)
            seen.add(key)
            row, model = summary[key], data["models"][key]
            assert cells[1].strip("`") == model["arch"], key
            assert _number(cells[2]) == round(row["tokens_per_s"]), (key, cells[2], row["tokens_per_s"])
            assert _number(cells[3]) == round(row["final_ppl"], _decimals(cells[3])), (key, cells[3], row["final_ppl"])
            assert _decimals(cells[3]) >= 2, key
            assert abs(model["points"][-1]["ppl"] - row["final_ppl"]) < 1e-9, key
            fraction = row["time_fractions"].get("smlp_top1")
            if key == "smlp_top1":
                assert cells[4] == "-"
            elif fraction is None:
                assert cells[4] == "not reached", key
            else:
                assert _number(cells[4]) == round(fraction, _decimals(cells[4])), (key, cells[4], fraction)
        assert seen == set(summary), (seen, set(summary))


def test_headline_table_agrees_with_the_markdown_results_file():
    """The .md rendering of the same results (what a reader opens from the link) shows the same figures."""
    for source, rows in _figure_tables():
        md = (ROOT / source).with_suffix(".md").read_text(encoding="utf-8")
        for cells in rows[2:]:
            key = re.search(r"`([^`]+)`", cells[0]).group(1)
            line = next(l for l in md.splitlines() if l.startswith(f"| {key} |"))
            assert f"| {cells[2]} |" in line and f"| {cells[3]} |" in line, (key, line)


def test_readme_quotes_no_other_result_figures():
    """Outside code blocks, the quickstart block and the checked tables, the README states no
    perplexity, tokens/s or percentage: such figures belong to a results file and docs/."""
    lines, inside_code, inside_quick, inside_table = _readme_lines(), False, False, False
    for line in lines:
        if line.startswith("```"):
            inside_code = not inside_code
            continue
        if "quickstart:begin" in line:
            inside_quick = True
        if "quickstart:end" in line:
            inside_quick = False
            continue
        if FIGURES_MARKER.search(line):
            inside_table = True
            continue
        if inside_table and not line.startswith("|"):
            inside_table = False
        if inside_code or inside_quick or inside_table:
            continue
        assert not re.search(r"\d+(\.\d+)?\s*%|\bppl \d|perplexity (of )?\d|\d[\d,]* tokens/s", line), line


def _links(path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        yield target.split("#")[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    if not page.exists():
        pytest.skip(f"{page} missing")
    broken = [t for t in _links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_advice(page):
    """Loading is safe by default: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD appears only to say it is not needed."""
    if not page.exists():
        pytest.skip(f"{page} missing")
    for line in page.read_text(encoding="utf-8").splitlines():
        if "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in line:
            assert re.search(r"not needed|no need|never needed|unnecessary", line, re.I), line


def test_docs_drop_history_and_machine_paths():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "../shared/data" not in text, page
        assert "could not be re-measured" not in text, page
        assert not re.search(r"\bissue \d+", text, re.I), page
