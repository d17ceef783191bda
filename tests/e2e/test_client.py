"""The command-line client against the running gateway: readable tables, errors without tracebacks,
markers and filters that tell the truth, `users`, `info` and `call` (any RPC as JSON)."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
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
    spans[-1] = (spans[-1][0], None)  # the last column's cells may be shorter or longer than its rule
    headers = [lines[i - 1][a:b].strip() for a, b in spans]
    return [
        {h: line[a:b].strip() for h, (a, b) in zip(headers, spans)}
        for line in lines[i + 1 :]
        if line[: spans[0][1]].strip().isdigit()
    ]


def test_recommend_prints_an_aligned_table_with_reasons(run):
    code, out, err = run("recommend", "Naruto", "Bleach", "Fullmetal Alchemist", "--limit", "5", "--explain")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == (
        "favourites: Naruto → Naruto (#20); Bleach → Bleach (#269); Fullmetal Alchemist → Fullmetal Alchemist (#121)"
    )
    table = parse_table(out)
    assert [r["rank"] for r in table] == ["1", "2", "3", "4", "5"]
    scores = [float(r["score"]) for r in table]
    assert scores == sorted(scores, reverse=True)
    assert all(
        r["title"] and r["type"] in {"TV", "Movie", "OVA", "ONA", "Special"} and r["year"] == "-" and r["genres"]
        for r in table
    )
    assert any(line.startswith("        - ") for line in lines)  # explanations under the rows
    # the vector-index strategy (still named DROPOUTNET in the API) scored by the served hybrid
    assert "served by: dropoutnet (anime2vec-hybrid), model " in out
    assert "next page: --page-token " in out and "degraded" not in out


def test_the_next_page_token_continues_the_listing(run):
    _, out, _ = run("similar", "Cowboy Bebop", "--limit", "4")
    token = out.split("next page: --page-token ")[1].split()[0]
    _, page2, _ = run("similar", "Cowboy Bebop", "--limit", "4", "--page-token", token)
    assert [r["rank"] for r in parse_table(page2)] == ["5", "6", "7", "8"]
    assert not {r["title"] for r in parse_table(page2)} & {r["title"] for r in parse_table(out)}


def test_errors_print_status_field_and_suggestions_without_traceback(run):
    code, out, err = run("recommend", "Naruto", "Narutoo Shipuden Movie 9")
    assert code == 1 and out == ""
    assert err.startswith(
        "error: NOT_FOUND: favourites[1].title: anime 'Narutoo Shipuden Movie 9' not found; did you mean:"
    )
    assert "Naruto: Shippuuden Movie" in err and "Traceback" not in err
    code, _, err = run("recommend", "", "y" * 300, "--limit", "-1")
    assert code == 1 and err.splitlines()[0].startswith("error: INVALID_ARGUMENT:")
    assert {"  favourites[0].title: blank title", "  options.limit: must be >= 0 (0 means the default), got -1"} <= set(
        err.splitlines()
    )
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


# ---- results and filters tell the truth ---------------------------------------------------------


@pytest.fixture(scope="module")
def interactions(bundle) -> dict[str, set[int]]:
    """The bundle's anime by what the model knows of their ratings: "trained" (it has factors),
    "held_out" (ratings in the data, kept out of training: the evaluation's val/test items) and
    "unrated" (no factors, not held out)."""
    arrays = {
        k: np.load(bundle / "arrays" / f"{k}.npy") for k in ("item_ids", "wmf_V", "split.val_items", "split.test_items")
    }
    ids, trained = arrays["item_ids"], np.any(arrays["wmf_V"] != 0, axis=1)
    held = np.zeros(len(ids), bool)
    held[np.concatenate([arrays["split.val_items"], arrays["split.test_items"]])] = True
    return {
        "trained": set(ids[trained].tolist()),
        "held_out": set(ids[held & ~trained].tolist()),
        "unrated": set(ids[~held & ~trained].tolist()),
    }


def test_cold_start_marks_only_anime_without_ratings_and_held_out_ones_say_so(run, interactions):
    args = ("recommend", "Naruto", "Bleach", "Fullmetal Alchemist", "--limit", "30")
    code, out, _ = run(*args, "--json")
    recs = json.loads(out)["recommendations"]
    assert code == 0 and recs
    for r in recs:
        aid = int(r["animeId"])
        assert r.get("coldStart", False) == (aid in interactions["unrated"]), r
        assert r.get("heldOut", False) == (aid in interactions["held_out"]), r
    assert any(r.get("heldOut") for r in recs)  # the sample bundle serves held-out anime: both kinds show
    code, out, _ = run(*args)
    rows = parse_table(out)
    assert [r["title"].endswith(" †") for r in rows] == [bool(r.get("heldOut")) for r in recs]
    assert [r["title"].endswith(" *") for r in rows] == [bool(r.get("coldStart")) for r in recs]
    assert "† has ratings, but they were held out of this model's training" in out
    assert "no ratings yet" not in out


def test_unknown_genres_and_types_are_refused_with_the_catalogues_own(run):
    code, out, err = run("recommend", "Naruto", "--genre", "NotAGenre", "--exclude-genre", "Mechaa", "--type", "Serial")
    assert (code, out) == (1, "") and err.startswith("error: INVALID_ARGUMENT: ")
    lines = err.splitlines()
    assert "  options.filters.include_genres[0]: unknown genre 'NotAGenre'" in lines
    assert "  options.filters.exclude_genres[0]: unknown genre 'Mechaa'; did you mean 'Mecha'?" in lines
    assert any(line.startswith("  options.filters.types[0]: unknown type 'Serial'") for line in lines)
    assert "genres: Action, Adventure," in err and "types: Movie, ONA, OVA, Special, TV" in err
    code, _, err = run("similar", "Cowboy Bebop", "--genre", "SPORTS", "--type", "tv", "--limit", "3")
    assert code == 0, err  # matching is case-insensitive


def test_wmf_folds_in_favourites_it_has_ratings_for_and_says_why_it_cannot(run, interactions):
    code, out, err = run("recommend", "--id", "1", "--strategy", "wmf", "--limit", "3")  # Cowboy Bebop, trained
    assert code == 0 and "served by: wmf (wmf)" in out and "degraded" not in out, out + err
    held = min(interactions["held_out"])
    code, out, _ = run("recommend", "--id", str(held), "--strategy", "wmf", "--limit", "3")
    assert code == 0 and "served by: popularity" in out
    assert (
        "degraded: WMF cannot serve this request: none of its anime has interactions in the model "
        f"({out.split('→ ')[1].split(' (#')[0]}: its ratings were held out of this model's training)"
    ) in out


def test_a_reranked_list_says_so(run, tmp_path):
    code, out, _ = run("similar", "Cowboy Bebop", "--limit", "5")
    assert code == 0 and "re-ranked" not in out
    code, out, _ = run("similar", "Cowboy Bebop", "--limit", "5", "--diversity", "0.3")
    assert (
        code == 0
        and (
            "re-ranked: diversity 0.3 (maximal marginal relevance) (scores are the model's, "
            "so a lower one may rank higher)"
        )
        in out
    )
    export = tmp_path / "animelist.xml.gz"
    export.write_bytes(gzip.compress(MAL_XML.encode()))
    code, out, _ = run("import-mal", str(export), "--limit", "5")
    assert code == 0 and "re-ranked: away from " in out and " disliked anime" in out  # the list's dropped anime


def test_info_leads_with_the_version_and_lists_metrics_on_request(run):
    code, out, _ = run("info")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("model version   ")
    assert re.fullmatch(r"offline metrics \d+ \(--metrics lists them\)", lines[-1]) and len(lines) == 5
    code, out, _ = run("info", "--metrics")
    assert code == 0 and out.splitlines()[0].startswith("model version") and len(out.splitlines()) > 10


def test_users_lists_ids_for_user_accepts(run):
    code, out, _ = run("users", "--limit", "3")
    users = out.split()
    assert code == 0 and len(users) == 3 and all(u.isdigit() for u in users)
    code, out, _ = run("info")
    assert f"example users   {', '.join(users)}, " in out
    for user in users:
        code, out, err = run("for-user", user, "--limit", "2")
        assert code == 0 and "served by: " in out, err


def test_call_sends_any_rpc_as_json_through_reflection(run, stack):
    code, out, _ = run("call", "list")
    assert code == 0 and out.split() == ["anime2vec.v1.GatewayService", "grpc.health.v1.Health"]
    code, out, _ = run(
        "call",
        "anime2vec.v1.GatewayService/Recommend",
        '{"favourites": [{"title": "Naruto"}, {"anime_id": 121}], "options": {"limit": 2}}',
    )
    resp = json.loads(out)
    assert (
        code == 0 and [f["animeId"] for f in resp["favourites"]] == ["20", "121"] and len(resp["recommendations"]) == 2
    )
    code, out, _ = run(
        "--api-key", "", "call", "grpc.health.v1.Health/Check", '{"service": "anime2vec.v1.GatewayService"}'
    )
    assert (code, json.loads(out)) == (0, {"status": "SERVING"})  # health needs no key
    code, out, err = run("call", "Recommend", '{"favourites": []}')
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: favourites:")
    code, out, err = run("call", "Recomend")
    assert (code, out) == (2, "") and err.startswith("error: no service here has a method 'Recomend'")
    code, out, err = run("call", "Recommend", '{"favourites": [{"titel": "Naruto"}]}')
    assert code == 2 and 'has no field named "titel"' in err
    code, out, _ = run("--address", stack.procs["encoder"].spec.address, "call", "anime2vec.v1.EncoderService/GetInfo")
    assert code == 0 and json.loads(out)["dim"] == 384
