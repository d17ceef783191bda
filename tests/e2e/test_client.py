"""The command-line client against the running gateway: readable tables, errors without tracebacks."""

from __future__ import annotations

import gzip
import re

import pytest

from anime2vec import client
from tests.e2e.support import API_KEYS, Stack
from tests.e2e.test_api import MAL_XML


@pytest.fixture
def run(stack: Stack, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        code = client.main(["--address", stack.procs["gateway"].spec.address, "--api-key", API_KEYS[0], *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def parse_table(out: str) -> list[dict[str, str]]:
    """The table's data rows as {header: cell}, cut at the columns the dashed rule marks."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+(  -+)*", line))
    spans = [m.span() for m in re.finditer(r"-+", lines[i])]
    spans[-1] = (spans[-1][0], None)   # the last column's cells may be shorter or longer than its rule
    headers = [lines[i - 1][a:b].strip() for a, b in spans]
    return [{h: line[a:b].strip() for h, (a, b) in zip(headers, spans)}
            for line in lines[i + 1:] if line[: spans[0][1]].strip().isdigit()]


def test_recommend_prints_an_aligned_table_with_reasons(run):
    code, out, err = run("recommend", "Naruto", "Bleach", "Fullmetal Alchemist", "--limit", "5", "--explain")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == ("favourites: Naruto → Naruto (#20); Bleach → Bleach (#269); "
                        "Fullmetal Alchemist → Fullmetal Alchemist (#121)")
    table = parse_table(out)
    assert [r["rank"] for r in table] == ["1", "2", "3", "4", "5"]
    scores = [float(r["score"]) for r in table]
    assert scores == sorted(scores, reverse=True)
    assert all(r["title"] and r["type"] in {"TV", "Movie", "OVA", "ONA", "Special"} and r["year"] == "-"
               and r["genres"] for r in table)
    assert any(line.startswith("        - ") for line in lines)   # explanations under the rows
    assert "served by: dropoutnet" in out and "next page: --page-token " in out and "degraded" not in out


def test_the_next_page_token_continues_the_listing(run):
    _, out, _ = run("similar", "Cowboy Bebop", "--limit", "4")
    token = out.split("next page: --page-token ")[1].split()[0]
    _, page2, _ = run("similar", "Cowboy Bebop", "--limit", "4", "--page-token", token)
    assert [r["rank"] for r in parse_table(page2)] == ["5", "6", "7", "8"]
    assert not {r["title"] for r in parse_table(page2)} & {r["title"] for r in parse_table(out)}


def test_errors_print_status_field_and_suggestions_without_traceback(run):
    code, out, err = run("recommend", "Naruto", "Narutoo Shipuden Movie 9")
    assert code == 1 and out == ""
    assert err.startswith("error: NOT_FOUND: favourites[1].title: anime 'Narutoo Shipuden Movie 9' not found; did you mean:")
    assert "Naruto: Shippuuden Movie" in err and "Traceback" not in err
    code, _, err = run("recommend", "", "y" * 300, "--limit", "-1")
    assert code == 1 and err.splitlines()[0].startswith("error: INVALID_ARGUMENT:")
    assert {"  favourites[0].title: blank title", "  options.limit: must be >= 0 (0 means the default), got -1"} <= set(err.splitlines())
    code, _, err = run("--api-key", "nope", "info")
    assert code == 1 and err.strip() == "error: PERMISSION_DENIED: API key not recognised"


def test_import_mal_and_search_text_and_resolve(run, tmp_path):
    export = tmp_path / "animelist.xml.gz"
    export.write_bytes(gzip.compress(MAL_XML.encode()))
    code, out, _ = run("import-mal", str(export), "--limit", "3")
    assert code == 0
    assert out.startswith("read 7 entries of e2e_tester (2 not in the catalogue); 3 favourites:")
    assert "Naruto" in out and "Completed" in out
    code, out, _ = run("search-text", "a samurai wanders through feudal Japan", "--limit", "3", "--type", "TV")
    assert code == 0 and [r["type"] for r in parse_table(out)] == ["TV", "TV", "TV"]
    code, out, _ = run("resolve", "cowboy beb", "--limit", "2")
    assert code == 0 and parse_table(out)[0]["title"] == "Cowboy Bebop" and parse_table(out)[0]["id"] == "1"
    code, out, err = run("import-mal", str(tmp_path / "missing.xml"))
    assert (code, out) == (2, "") and err.startswith(f"error: cannot read {tmp_path / 'missing.xml'}: No such file")
