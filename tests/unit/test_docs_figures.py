"""README.md and docs/ stay true: the README's figures equal the results files they come from,
its links resolve, it stays short and keeps the commands that CI and the quickstart run."""
import json
import re

import pytest

from conftest import REPO
from benchmarks import compare

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
    test_command = "python -m pytest -q -n logical --dist loadfile tests"
    assert test_command in text
    if ci:
        assert test_command in ci
    assert "fairseq-smlp-quickstart" in text
    install = 'pip install torch==2.13.0 numpy cython && pip install --no-build-isolation -e ".[test]"'
    assert f"{install} && fairseq-smlp-quickstart" in text
    assert f"{install} && {test_command}" in text
    assert "<!-- quickstart:begin -->" in text and "<!-- quickstart:end -->" in text


def test_headline_table_matches_its_results_file():
    tables = _figure_tables()
    assert tables, "README.md has no <!-- figures: FILE --> table"
    for source, rows in tables:
        path = ROOT / source
        assert path.exists(), source
        data = json.loads(path.read_text(encoding="utf-8"))
        header, body = rows[0], [r for r in rows[2:]]
        assert header[:4] == ["model", "arch", "tokens/s", "final valid ppl"], header
        variant = re.fullmatch(r"`?(\w+)`?'s time to this ppl", header[4]).group(1)  # an sMLP of the comparison
        assert variant in compare.SMLP, header
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
            fraction = row["time_fractions"].get(variant)
            if key == variant:
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


# ------------------------------------------------ figures in docs/ and benchmarks/README.md
# A figure: a number with a decimal point, a thousands comma, a percent sign, an `x` ratio, an
# M / k / G multiplier or an exponent. Counts and settings without them ("4 experts",
# "--lr 0.008" in code) are not figures; inline code and code blocks are not read.
FIGURE = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e-\d+)?(?:%|x\b|[MkG]\b)?")
# what reports a measurement wherever it stands: a decimal percentage or ratio, a rate, or
# a perplexity / accuracy / "measured" with its number
MEASURED = re.compile(r"\d\.\d+ ?%|\d\.\d+x\b|\d tokens/s|\bmeasured\b[^.;:]*?\d|\b(ppl|perplexity|accuracy)( is| of)? [\d,.]*\d")
FIGURE_PAGES = DOCS + [ROOT / "benchmarks" / "README.md"]
# a table announced by `<!-- computed: COMMAND -->` is what COMMAND prints (counts, not measurements)
COMPUTED_MARKER = re.compile(r"<!-- computed: .+ -->")
SCALE = {"M": 1e6, "k": 1e3, "G": 1e9}


def _blocks(text):
    """Paragraphs, list items and tables (code blocks dropped). An indented paragraph continues
    the list item above it, and a table belongs to the paragraph that introduces it: both carry
    the links of what they continue."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        starts_item = re.match(r"[-*] |\d+\. ", line)
        if not line.strip() or (starts_item and current) or (line.startswith("|") and current and not current[-1].startswith("|")):
            if current:
                blocks.append("\n".join(current))
            current = [line] if line.strip() else []
        else:
            current.append(line)
    linked = []
    for block in blocks:
        continues = block.startswith(("  ", "|")) and linked
        linked.append((block, (linked[-1][1] + " " + linked[-1][0]) if continues else ""))
    return linked


def _results_files(page, text):
    """The results files (benchmarks/results/..., .md with its .json) that text links."""
    files = []
    for target in re.findall(r"\]\(([^)\s#]+)", text):
        path = (page.parent / target).resolve()
        if (ROOT / "benchmarks" / "results") in path.parents and path.is_file() and path.suffix in (".md", ".json"):
            files += [path] + ([path.with_suffix(".json")] if path.suffix == ".md" and path.with_suffix(".json").exists() else [])
    return files


def _value(figure):
    scale = SCALE.get(figure[-1], 1)
    return float(figure.rstrip("%xMkG").replace(",", "")) * scale, scale


def _file_values(path):
    """Every number a results file states: in its text, and (JSON) every value, also as a percentage."""
    text = path.read_text(encoding="utf-8")
    values = {abs(_value(f)[0]) for f in FIGURE.findall(text)}
    if path.suffix == ".json":
        def walk(node):
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                values.update({abs(float(node)), abs(100 * float(node))})
            elif isinstance(node, (dict, list)):
                for child in node.values() if isinstance(node, dict) else node:
                    walk(child)
        walk(json.loads(text))
    return values


def _states(figure, values):
    """A results file states figure when one of its numbers rounds to it (to the figure's decimals)."""
    value, scale = _value(figure)
    mantissa = figure.rstrip("%xMkG").split("e")[0]
    if "e-" in figure:
        return any(abs(v - abs(value)) <= 0.05 * abs(value) for v in values)
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return any(round(v / scale, decimals) == round(abs(value) / scale, decimals) for v in values)


def _prose(block):
    block = re.sub(r"`[^`]*`", "", block)
    return re.sub(r"\]\([^)]*\)", "]", block)


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_figure_is_stated_by_a_results_file_its_paragraph_links(page):
    """A paragraph (list item, table) that links results files quotes only figures those files
    state: a figure typed by hand, or left behind by a re-measurement, fails here."""
    for block, inherited in _blocks(page.read_text(encoding="utf-8")):
        files = _results_files(page, block + " " + inherited)
        if not files:
            continue
        values = set().union(*map(_file_values, files))
        figures = [f for f in FIGURE.findall(_prose(block)) if re.search(r"[.,%xMkG]|e-", f)]
        missing = [f for f in figures if not _states(f, values)]
        assert not missing, f"{page.relative_to(ROOT)}: {missing} in a paragraph whose results files {[f.name for f in files]} do not state them:\n{block}"


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_measurement_comes_with_its_results_file(page):
    """Outside paragraphs that link results files, no perplexity, accuracy, rate, speed-up or
    measured figure: each would be a figure nobody can trace or re-check."""
    for block, inherited in _blocks(page.read_text(encoding="utf-8")):
        if _results_files(page, block + " " + inherited) or (block.startswith("|") and COMPUTED_MARKER.search(inherited)):
            continue
        found = MEASURED.search(_prose(block))
        assert not found, f"{page.relative_to(ROOT)}: '{found.group(0)}' without a results file:\n{block}"


# ------------------------------------------------ tables a command prints
# `<!-- computed: python -m MODULE ARGS -->` announces that the next table is what the command
# prints (docs/baselines.md: the FLOPs / parameter tables of fairseq_smlp.flops, built on the
# meta device): the command is rerun here and every cell compared as the doc writes it.
COMPUTED_COMMAND = re.compile(r"<!-- computed: python -m ([\w.]+)((?: \S+)*) -->")


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_after(lines, start):
    """The rows (as cells) of the markdown table that starts at lines[start], blank lines skipped."""
    while start < len(lines) and not lines[start].strip():
        start += 1
    rows = []
    while start < len(lines) and lines[start].startswith("|"):
        rows.append(_cells(lines[start]))
        start += 1
    return rows


def _computed_tables():
    """(page, module, args, rows) of every table announced by a computed marker in docs/."""
    found = []
    for page in FIGURE_PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if COMPUTED_MARKER.search(line):
                m = COMPUTED_COMMAND.search(line)
                assert m, f"{page.relative_to(ROOT)}: a computed table's command must be `python -m MODULE ARGS`: {line}"
                found.append((page, m.group(1), m.group(2).split(), _table_after(lines, i + 1)))
    return found


def _printed_rows(module, args, monkeypatch, capsys):
    """The table rows `python -m module args` prints, run in this process (fairseq imported once)."""
    import runpy
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", [module, *args])
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the module is already imported: runpy says so
        runpy.run_module(module, run_name="__main__")
    return [_cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("|")]


COMPUTED = _computed_tables()


def test_docs_have_computed_tables():
    assert any(page.name == "baselines.md" and "--table" in args for page, _, args, _ in COMPUTED), COMPUTED


@pytest.mark.parametrize("page,module,args,rows", [
    pytest.param(*table, id=f"{table[0].name}: {' '.join(table[2])}") for table in COMPUTED])
def test_computed_table_is_what_its_command_prints(page, module, args, rows, monkeypatch, capsys):
    """Every row of the table, cell by cell, as the command formats it: a model or a count
    that changed without the table being re-pasted fails here."""
    printed = _printed_rows(module, args, monkeypatch, capsys)
    where = f"{page.relative_to(ROOT)} (`python -m {module} {' '.join(args)}`)"
    assert rows[:2] == printed[:2], f"{where}: header {rows[:2]} vs printed {printed[:2]}"
    doc, fresh = {r[0]: r for r in rows[2:]}, {r[0]: r for r in printed[2:]}
    assert list(doc) == list(fresh), f"{where}: rows {list(doc)} vs printed {list(fresh)}"
    for key, cells in fresh.items():
        wrong = [f"{h}: {d} (doc) vs {c}" for h, d, c in zip(printed[0], doc[key], cells) if d != c]
        assert not wrong and len(doc[key]) == len(cells), f"{where}: {key}: {wrong}"


def _params_totals(page):
    """The `params total` cells of the page's computed tables, as numbers."""
    totals = []
    for table_page, _, _, rows in COMPUTED:
        if table_page == page and "params total" in rows[0]:
            column = rows[0].index("params total")
            totals += [_value(row[column])[0] for row in rows[2:]]
    return totals


def test_parameter_counts_in_prose_come_from_a_computed_table():
    """A parameter count written in prose beside a computed table (`8.85B`) is the `params
    total` of one of that page's rows, rounded to the figure's decimals."""
    for page in {page for page, *_ in COMPUTED}:
        totals = _params_totals(page)
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for figure, decimals in re.findall(r"(?<![\w.])(\d+\.(\d+))B\b", _prose(text)):
            assert any(round(t / 1e9, len(decimals)) == float(figure) for t in totals), (
                f"{page.relative_to(ROOT)}: {figure}B is no params total of its computed tables")
