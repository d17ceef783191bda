"""Command-line client of the gateway: `python -m anime2vec.client <command> ...`.

    recommend "Naruto" "Bleach" "Fullmetal Alchemist" --limit 10 --explain
    similar "Cowboy Bebop"
    search-text "two brothers search for a stone that restores bodies"
    add-anime --title "Sea Dogs" --synopsis "Pirates hunt for treasure..." --genre Adventure
    import-mal animelist.xml.gz
    resolve "fullmetal alch"
    feedback --user 42 --completed "Naruto" --rated "Bleach=9" --dropped id:269
    for-user 42
    users
    info
    call Recommend '{"favourites": [{"title": "Naruto"}], "options": {"limit": 5}}'

The gateway address and API key come from --address / --api-key or A2V_GATEWAY_ADDRESS /
A2V_API_KEY (`make run` prints the local key; it is in var/run/api-key). --tls (public roots) or
--tls-ca-file dials the gateway over TLS; --tls-cert-file and --tls-key-file present a client
certificate (env A2V_CLIENT_TLS_CA_FILE, ..._CERT_FILE, ..._KEY_FILE, ..._SERVER_NAME). Results print as an aligned table; a degraded answer says so; errors print their status,
the fields at fault and any suggestions (exit status 1), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson

from anime2vec import reflection_call
from anime2vec.serving.errors import ErrorDetails
from anime2vec.serving.tls import ClientTLS, TLSFileError, open_channel
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50050"
STRATEGIES = {
    "auto": common_pb2.STRATEGY_AUTO,
    "dropoutnet": common_pb2.STRATEGY_DROPOUTNET,
    "wmf": common_pb2.STRATEGY_WMF,
    "popularity": common_pb2.STRATEGY_POPULARITY,
}
_TITLE_WIDTH, _GENRES_WIDTH = 50, 40


# ---- output ------------------------------------------------------------------------------------


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns listed in `right` are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line("-" * w for w in widths), *(line(r) for r in rows)])


COLD_MARK, HELD_OUT_MARK = "*", "†"


def format_recommendations(recs: Sequence[common_pb2.Recommendation], explain: bool, filtered: bool = False) -> str:
    if not recs:
        return "(no results: no anime left after the filters)" if filtered else "(no results)"
    rows = []
    for r in recs:
        title = (
            _clip(r.title, _TITLE_WIDTH)
            + (f" {COLD_MARK}" if r.cold_start else "")
            + (f" {HELD_OUT_MARK}" if r.held_out else "")
        )
        rows.append(
            [
                str(r.rank),
                title,
                f"{r.score:.4f}",
                r.type or "-",
                str(r.year) if r.HasField("year") else "-",
                _clip(", ".join(r.genres), _GENRES_WIDTH) or "-",
            ]
        )
    out = table(["rank", "title", "score", "type", "year", "genres"], rows, right=(0, 2)).splitlines()
    if explain:  # why, under each row, indented past the rank column: the server's one line, else its reasons
        lines = out[:2]
        for r, line in zip(recs, out[2:]):
            lines.append(line)
            if r.explanation:
                lines.append(f"        - {r.explanation}")
            else:
                lines.extend(
                    f"        - {x.detail or common_pb2.ReasonKind.Name(x.kind)} ({x.weight:.0%})" for x in r.reasons
                )
        out = lines
    if any(r.cold_start for r in recs):
        out.append(f"{COLD_MARK} cold start: no ratings in the training data, recommended from its text")
    if any(r.held_out for r in recs):
        out.append(
            f"{HELD_OUT_MARK} has ratings, but they were held out of this model's training (to measure "
            f"cold start): recommended from its text"
        )
    return "\n".join(out)


def format_served_by(s: common_pb2.ServedBy, next_page_token: str) -> str:
    lines = [
        f"served by: {common_pb2.Strategy.Name(s.strategy).removeprefix('STRATEGY_').lower()}"
        f" ({s.scorer}), model {s.model_version or '-'}"
    ]
    if s.reranked:
        lines.append(f"re-ranked: {s.reranked} (scores are the model's, so a lower one may rank higher)")
    if s.degraded:
        lines.append(f"degraded: {s.degraded_reason or 'yes'}")
    if next_page_token:
        lines.append(f"next page: --page-token {next_page_token}")
    return "\n".join(lines)


def format_resolved(label: str, resolved: Sequence[gateway_pb2.ResolvedAnime]) -> str:
    parts = []
    for r in resolved:
        asked = r.query.title if r.query.WhichOneof("ref") == "title" else f"id {r.query.anime_id}"
        how = "" if r.match_score >= 100 else f", matched {r.matched_name!r} {r.match_score:.0f}%"
        parts.append(f"{asked} → {r.title or '?'} (#{r.anime_id}{how})")
    return f"{label}: " + "; ".join(parts)


def format_error(err: grpc.RpcError, address: str) -> str:
    d = ErrorDetails.from_rpc_error(err)
    if d.code == grpc.StatusCode.UNAVAILABLE and not d.reason:
        return f"error: cannot reach the gateway at {address} ({d.message}). Is it running (make run)?"
    lines = [f"error: {d.code.name}: {d.message}"]
    if len(d.field_violations) > 1:
        lines += [f"  {f}: {why}" for f, why in d.field_violations.items()]
    if d.suggestions and "did you mean" not in d.message:
        lines.append("  did you mean: " + ", ".join(repr(s) for s in d.suggestions))
    for key, values in sorted(d.metadata.items()):  # known_genres, known_types: the message may be clipped
        if key.startswith("known_") and values not in d.message:
            lines.append(f"  {key.removeprefix('known_')}: {values}")
    if d.retry_after_s is not None:
        lines.append(f"  retry in {d.retry_after_s:g} s")
    if d.code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append("  set A2V_API_KEY or pass --api-key (make run prints the local key)")
    return "\n".join(lines)


# ---- requests ----------------------------------------------------------------------------------


class UsageError(Exception):
    """A problem with the command line or a local file, found before any call."""


def _ref(value: str | int) -> common_pb2.AnimeRef:
    return common_pb2.AnimeRef(anime_id=value) if isinstance(value, int) else common_pb2.AnimeRef(title=value)


def options(a: argparse.Namespace) -> common_pb2.RecommendOptions:
    f = common_pb2.Filters(
        include_genres=a.genre,
        exclude_genres=a.exclude_genre,
        types=a.type,
        include_liked=a.include_liked,
        cold_start_only=a.cold_start_only,
    )
    if a.year_min is not None:
        f.year_min = a.year_min
    if a.year_max is not None:
        f.year_max = a.year_max
    return common_pb2.RecommendOptions(
        limit=a.limit,
        page_token=a.page_token,
        filters=f,
        diversity=a.diversity,
        strategy=STRATEGIES[a.strategy],
        explain=a.explain,
    )


def _print_ranked(resp, a: argparse.Namespace, header: str = "") -> None:
    """The raw response with --json; else `header` (what the query resolved to) and the table."""
    if a.json:
        print(MessageToJson(resp))
        return
    if header:
        print(header)
    f = options(a).filters
    filtered = bool(
        f.include_genres
        or f.exclude_genres
        or f.types
        or f.HasField("year_min")
        or f.HasField("year_max")
        or f.cold_start_only
    )
    print(format_recommendations(resp.recommendations, a.explain, filtered))
    print(format_served_by(resp.served_by, resp.next_page_token))


def cmd_recommend(stub, a, md):
    if not a.titles and not a.id:
        raise UsageError("give at least one favourite title (or --id)")
    req = gateway_pb2.RecommendRequest(
        favourites=[_ref(t) for t in a.titles] + [_ref(i) for i in a.id],
        disliked=[_ref(t) for t in a.dislike],
        options=options(a),
    )
    resp = stub.Recommend(req, timeout=a.timeout, metadata=md)
    header = format_resolved("favourites", resp.favourites)
    if resp.disliked:
        header += "\n" + format_resolved("disliked", resp.disliked)
    _print_ranked(resp, a, header)


def cmd_similar(stub, a, md):
    if (a.title is None) == (a.id is None):
        raise UsageError("give exactly one of a title or --id")
    req = gateway_pb2.SimilarRequest(anime=_ref(a.id if a.id is not None else a.title), options=options(a))
    resp = stub.Similar(req, timeout=a.timeout, metadata=md)
    _print_ranked(resp, a, format_resolved("similar to", resp.favourites))


def cmd_search_text(stub, a, md):
    resp = stub.SearchText(
        gateway_pb2.SearchTextRequest(query=a.query, options=options(a)), timeout=a.timeout, metadata=md
    )
    _print_ranked(resp, a)


def cmd_for_user(stub, a, md):
    resp = stub.RecommendForUser(
        common_pb2.RecommendForUserRequest(user_id=a.user_id, options=options(a)), timeout=a.timeout, metadata=md
    )
    _print_ranked(resp, a)


def cmd_import_mal(stub, a, md):
    try:
        data = Path(a.file).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {a.file}: {e.strerror or e}") from None
    resp = stub.ImportMalList(
        gateway_pb2.ImportMalListRequest(mal_xml=data, min_score=a.min_score, options=options(a)),
        timeout=a.timeout,
        metadata=md,
    )
    if a.json:
        return print(MessageToJson(resp))
    who = f" of {resp.username}" if resp.username else ""
    print(
        f"read {resp.entries_read} entries{who} ({resp.entries_unknown} not in the catalogue); "
        f"{len(resp.favourites)} favourites:"
    )
    print(
        table(
            ["score", "weight", "status", "title"],
            [
                [str(f.score or "-"), f"{f.weight:.2f}", f.status, _clip(f.title, _TITLE_WIDTH)]
                for f in resp.favourites[: a.show_favourites]
            ],
            right=(0, 1),
        )
    )
    if len(resp.favourites) > a.show_favourites:
        print(f"... and {len(resp.favourites) - a.show_favourites} more")
    print()
    _print_ranked(resp, a)


def cmd_add_anime(stub, a, md):
    anime = common_pb2.AnimeInput(
        title=a.title,
        title_english=a.english_title,
        synonyms=a.synonym,
        synopsis=a.synopsis,
        genres=a.genre,
        type=a.type or "",
    )
    if a.year is not None:
        anime.year = a.year
    if a.episodes is not None:
        anime.episodes = a.episodes
    req = gateway_pb2.AddAnimeRequest(anime=anime)
    if a.id is not None:
        req.anime_id = a.id
    resp = stub.AddAnime(req, timeout=a.timeout, metadata=md)
    print(f"{'added' if resp.created else 'replaced'} anime #{resp.anime_id} {a.title!r} (model {resp.model_version})")


def cmd_resolve(stub, a, md):
    resp = stub.ResolveTitles(
        gateway_pb2.ResolveTitlesRequest(query=a.query, limit=a.limit), timeout=a.timeout, metadata=md
    )
    if not resp.candidates:
        return print("(no matches)")
    print(
        table(
            ["id", "title", "match", "matched name", "type", "year", "members"],
            [
                [
                    str(c.anime_id),
                    _clip(c.title, _TITLE_WIDTH),
                    f"{c.match_score:.0f}",
                    _clip(c.matched_name, _TITLE_WIDTH),
                    c.type or "-",
                    str(c.year) if c.HasField("year") else "-",
                    str(c.members),
                ]
                for c in resp.candidates
            ],
            right=(0, 2, 6),
        )
    )


FEEDBACK_KINDS = {
    "rated": common_pb2.FEEDBACK_KIND_RATED,
    "completed": common_pb2.FEEDBACK_KIND_COMPLETED,
    "dropped": common_pb2.FEEDBACK_KIND_DROPPED,
    "added": common_pb2.FEEDBACK_KIND_ADDED,
    "removed": common_pb2.FEEDBACK_KIND_REMOVED,
}


class _EventAction(argparse.Action):
    """--rated/--completed/... append (kind, value) to one list, keeping command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.events = [*(getattr(namespace, "events", None) or []), (self.dest, value)]


def feedback_event(kind: str, value: str, user_id: int, event_id: str) -> gateway_pb2.FeedbackEvent:
    """One event from `TITLE`, `TITLE=SCORE`, `id:ANIME_ID` or `id:ANIME_ID=SCORE`."""
    anime, score = value, 0
    head, sep, tail = value.rpartition("=")
    if sep and tail.strip().isdigit():
        anime, score = head, int(tail)
    if kind == "rated" and not score:
        raise UsageError(f"--rated needs TITLE=SCORE (1..10), got {value!r}")
    ref = common_pb2.AnimeRef(title=anime)
    if anime.startswith("id:"):
        if not anime[3:].strip().isdigit():
            raise UsageError(f"id:ANIME_ID needs a number, got {anime!r}")
        ref = common_pb2.AnimeRef(anime_id=int(anime[3:]))
    return gateway_pb2.FeedbackEvent(
        event_id=event_id, user_id=user_id, anime=ref, kind=FEEDBACK_KINDS[kind], score=score
    )


def cmd_feedback(stub, a, md):
    given = list(a.event_id)
    events = getattr(a, "events", None) or []
    if not events:
        raise UsageError("give at least one event: --rated, --completed, --dropped, --added or --removed")
    if len(given) > len(events):
        raise UsageError(f"{len(given)} --event-id for {len(events)} events")
    ids = given + [str(uuid.uuid4()) for _ in range(len(events) - len(given))]
    req = gateway_pb2.RecordFeedbackRequest(events=[feedback_event(k, v, a.user, i) for (k, v), i in zip(events, ids)])
    resp = stub.RecordFeedback(req, timeout=a.timeout, metadata=md)
    if a.json:
        return print(MessageToJson(resp))
    print(
        table(
            ["event id", "kind", "anime", "id", "score"],
            [
                [e.event_id, k, _clip(r.title or "?", _TITLE_WIDTH), str(r.anime_id), str(e.score or "-")]
                for e, (k, _), r in zip(req.events, events, resp.anime)
            ],
            right=(3, 4),
        )
    )
    users = ", ".join(map(str, resp.updated_user_ids)) or "none (all duplicates)"
    print(f"applied {resp.applied}, duplicates {resp.duplicates}; users updated: {users} (model {resp.model_version})")


def cmd_info(stub, a, md):
    m = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=a.timeout, metadata=md).model
    if a.json:
        return print(MessageToJson(m))
    print(f"model version   {m.version}  (created {m.created_at.ToJsonString() if m.HasField('created_at') else '-'})")
    if m.preset == "quick":
        print("preset          quick: no MiniLM encodings (TF-IDF and metadata content); the full bundle replaces it")
    if m.next_model:
        print(f"next model      {m.next_model}")
    print(
        f"encoder         {m.encoder_name} ({m.encoder_fingerprint}), {m.encoder_dim} dims; towers {m.tower_dim} dims"
    )
    print(f"items / users   {m.n_items} / {m.n_users}")
    if m.example_user_ids:
        print(
            f"example users   {', '.join(map(str, m.example_user_ids))}  (for-user takes these, or any id given "
            f"feedback)"
        )
    if not a.metrics:
        print(f"offline metrics {len(m.offline_metrics)} (--metrics lists them)")
        return
    print("offline metrics")
    for key in sorted(m.offline_metrics):
        print(f"  {key:40s} {m.offline_metrics[key]:.4f}")


def cmd_users(stub, a, md):
    """User ids for-user accepts, one per line (so `for-user $(... users | head -1)` works)."""
    m = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=a.timeout, metadata=md).model
    if not m.example_user_ids:
        raise UsageError(
            f"model {m.version} names no users (it has {m.n_users}); users known through feedback are accepted too"
        )
    print("\n".join(map(str, m.example_user_ids[: a.limit])))


def cmd_call(channel, a, md):
    """Any RPC of the service at --address, request and response as JSON, through reflection."""
    try:
        if a.method in ("list", ""):
            return print("\n".join(reflection_call.services(channel)))
        if a.describe:
            return print(reflection_call.describe(channel, a.method))
        request = a.request
        if request == "-":
            request = sys.stdin.read()
        elif request.startswith("@"):
            try:
                request = Path(request[1:]).read_text()
            except OSError as e:
                raise UsageError(f"cannot read {request[1:]}: {e.strerror or e}") from None
        print(reflection_call.call(channel, a.method, request, metadata=md, timeout=a.timeout))
    except reflection_call.CallError as e:
        raise UsageError(str(e)) from None


# ---- command line ------------------------------------------------------------------------------


def _ranking_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ranking options")
    g.add_argument("--limit", type=int, default=10, help="results per page (server maximum 100)")
    g.add_argument("--page-token", default="", help="continue from a previous page")
    g.add_argument("--genre", action="append", default=[], help="keep anime with this genre (repeatable)")
    g.add_argument("--exclude-genre", action="append", default=[], help="drop anime with this genre (repeatable)")
    g.add_argument("--type", action="append", default=[], help="keep this media type: TV, Movie, OVA, ... (repeatable)")
    g.add_argument("--year-min", type=int, default=None)
    g.add_argument("--year-max", type=int, default=None)
    g.add_argument(
        "--new-only",
        "--cold-start-only",
        dest="cold_start_only",
        action="store_true",
        help="keep only anime without ratings in the model's training data (new, unrated or held-out "
        "anime, marked * or †): what is new for this query",
    )
    g.add_argument("--diversity", type=float, default=0.0, help="0 (relevance only) .. 1 (novelty only)")
    g.add_argument("--strategy", choices=sorted(STRATEGIES), default="auto")
    g.add_argument("--include-liked", action="store_true", help="allow the query's own anime in the results")
    g.add_argument("--explain", action="store_true", help="show why each anime was recommended")
    g.add_argument("--json", action="store_true", help="print the raw response as JSON")


def _connection_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Accepted before and after the command; the command's copy only overrides when given."""
    d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    p.add_argument(
        "--address",
        default=d(os.environ.get("A2V_GATEWAY_ADDRESS", DEFAULT_ADDRESS)),
        help="gateway host:port (env A2V_GATEWAY_ADDRESS)",
    )
    p.add_argument("--api-key", default=d(os.environ.get("A2V_API_KEY", "")), help="API key (env A2V_API_KEY)")
    p.add_argument("--timeout", type=float, default=d(30.0), help="deadline per call, seconds")
    env = os.environ.get
    p.add_argument(
        "--tls",
        action="store_true",
        default=d(False),
        help="dial over TLS, verifying the gateway against the public roots (implied by --tls-ca-file)",
    )
    p.add_argument(
        "--tls-ca-file",
        default=d(env("A2V_CLIENT_TLS_CA_FILE", "")),
        help="PEM CA bundle the gateway's certificate must chain to (env A2V_CLIENT_TLS_CA_FILE)",
    )
    p.add_argument(
        "--tls-cert-file",
        default=d(env("A2V_CLIENT_TLS_CERT_FILE", "")),
        help="PEM client certificate, for mutual TLS (env A2V_CLIENT_TLS_CERT_FILE)",
    )
    p.add_argument(
        "--tls-key-file",
        default=d(env("A2V_CLIENT_TLS_KEY_FILE", "")),
        help="PEM key of --tls-cert-file (env A2V_CLIENT_TLS_KEY_FILE)",
    )
    p.add_argument(
        "--tls-server-name",
        default=d(env("A2V_CLIENT_TLS_SERVER_NAME", "")),
        help="name expected in the gateway's certificate, if not the address's host (env A2V_CLIENT_TLS_SERVER_NAME)",
    )


def client_tls(a: argparse.Namespace) -> ClientTLS | None:
    """The TLS settings of the command line, checked; None for plaintext. UsageError for a bad file."""
    files = (a.tls_ca_file, a.tls_cert_file, a.tls_key_file)
    if not (a.tls or any(files) or a.tls_server_name):
        return None
    ca, cert, key = (Path(f) if f else None for f in files)
    try:
        return ClientTLS(ca, cert, key, a.tls_server_name).check()
    except TLSFileError as e:
        raise UsageError(f"TLS: {e}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m anime2vec.client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _connection_options(ap, defaults=True)
    connection = argparse.ArgumentParser(add_help=False)
    _connection_options(connection, defaults=False)
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[connection])

    p = add("recommend", help="recommendations for favourite anime")
    p.add_argument("titles", nargs="*", help="favourite titles (fuzzy-matched)")
    p.add_argument("--id", type=int, action="append", default=[], help="a favourite by MyAnimeList id (repeatable)")
    p.add_argument("--dislike", action="append", default=[], help="a disliked title (repeatable)")
    _ranking_options(p)
    p.set_defaults(run=cmd_recommend)

    p = add("similar", help="anime similar to one anime")
    p.add_argument("title", nargs="?")
    p.add_argument("--id", type=int, default=None, help="the anime by MyAnimeList id instead of a title")
    _ranking_options(p)
    p.set_defaults(run=cmd_similar)

    p = add("search-text", help="anime whose story matches a description")
    p.add_argument("query")
    _ranking_options(p)
    p.set_defaults(run=cmd_search_text)

    p = add(
        "feedback",
        help="record what a user did (rated, completed, dropped, added, removed); their recommendations change at once",
    )
    p.add_argument("--user", type=int, required=True, help="user id (a new id becomes a known user)")
    for kind, what in (
        ("rated", "TITLE=SCORE (1..10)"),
        ("completed", "TITLE or TITLE=SCORE"),
        ("dropped", "TITLE or TITLE=SCORE"),
        ("added", "TITLE (plan to watch)"),
        ("removed", "TITLE (off the list)"),
    ):
        p.add_argument(
            f"--{kind}",
            dest=kind,
            action=_EventAction,
            metavar="ANIME",
            help=f"{what}; id:ANIME_ID instead of a title; repeatable, order kept",
        )
    p.add_argument(
        "--event-id",
        action="append",
        default=[],
        help="id of the next event, in order (repeatable; default a new UUID each): resend the same "
        "ids to retry safely",
    )
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")
    p.set_defaults(run=cmd_feedback)

    p = add("for-user", help="recommendations for a user of the training data or known through feedback")
    p.add_argument("user_id", type=int)
    _ranking_options(p)
    p.set_defaults(run=cmd_for_user)

    p = add("import-mal", help="recommendations from a MyAnimeList export (XML, optionally .gz)")
    p.add_argument("file")
    p.add_argument("--min-score", type=int, default=0, help="lowest score that counts as a favourite (default 7)")
    p.add_argument("--show-favourites", type=int, default=10, help="how many imported favourites to list")
    _ranking_options(p)
    p.set_defaults(run=cmd_import_mal)

    p = add("add-anime", help="add an anime (or replace one with --id); recommendable at once")
    p.add_argument("--title", required=True)
    p.add_argument("--synopsis", required=True)
    p.add_argument("--genre", action="append", default=[])
    p.add_argument("--type", default=None, help="TV, Movie, OVA, ONA, Special or Music")
    p.add_argument("--year", type=int, default=None)
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--english-title", default="")
    p.add_argument("--synonym", action="append", default=[])
    p.add_argument("--id", type=int, default=None, help="replace the anime with this id")
    p.set_defaults(run=cmd_add_anime)

    p = add("resolve", help="title autocomplete")
    p.add_argument("query")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(run=cmd_resolve)

    p = add("info", help="the serving model: version, encoder, counts, example users")
    p.add_argument("--metrics", action="store_true", help="also list the bundle's offline evaluation metrics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = add("users", help="user ids for-user accepts (the training users with the most interactions)")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(run=cmd_users)

    p = add(
        "call",
        help="any RPC with a JSON request, through server reflection (like grpcurl); 'call list' lists the services",
    )
    p.add_argument(
        "method",
        help="e.g. Recommend, anime2vec.v1.GatewayService/Recommend, "
        "grpc.health.v1.Health/Check; 'list' for the services",
    )
    p.add_argument(
        "request",
        nargs="?",
        default="{}",
        help="the request as JSON (default {}); @FILE reads it from a file, - from stdin",
    )
    p.add_argument("--describe", action="store_true", help="show the methods of the service METHOD names")
    p.set_defaults(run=cmd_call, raw_channel=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    metadata = [("authorization", f"Bearer {a.api_key}")] if a.api_key else []
    try:
        tls = client_tls(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open_channel(a.address, tls) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            a.run(channel if getattr(a, "raw_channel", False) else stub, a, metadata)
        except grpc.RpcError as e:
            print(format_error(e, a.address), file=sys.stderr)
            return 1
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # piped into `head`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
    return 0


if __name__ == "__main__":
    sys.exit(main())
