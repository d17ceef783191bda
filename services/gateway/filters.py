"""Filters checked against the catalogue, so a filter that cannot match says why instead of
answering an empty list.

- A genre or type the catalogue has never heard of (a typo, "NotAGenre") is INVALID_ARGUMENT naming
  the field, with the catalogue's genres or types in the message and in ErrorInfo metadata
  (`known_genres`, `known_types`), reason UNKNOWN_FILTER_VALUE.
- A filter that is well-formed but that this catalogue cannot answer (a year bound when no anime
  has a known year, a documented type no anime has) is INVALID_ARGUMENT too, reason
  FILTER_UNANSWERABLE, naming the field and why. (It depends on the catalogue, which would make it
  FAILED_PRECONDITION by the letter of the status codes; callers act on it the same way, by changing
  the request, and every ranking RPC's contract keeps INVALID_ARGUMENT as its only bad-input status.)
- `cold_start_only` is not checked here: the catalogue snapshot does not know which anime the model
  has interactions for. The ranker knows, and answers the same FILTER_UNANSWERABLE when the served
  version has no cold anime at all (services/ranker/retrieval.py `cold_unanswerable`); the gateway
  passes that error on as it is. Like every filter, the field travels inside RecommendOptions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import grpc
import pandas as pd
from google.rpc import error_details_pb2
from rapidfuzz import process, utils

from anime2vec.serving.errors import DOMAIN, ServiceError
from anime2vec.v1 import common_pb2

# Media types the API documents (common.proto Filters.types), whether or not a catalogue has them.
DOCUMENTED_TYPES = ("TV", "Movie", "OVA", "ONA", "Special", "Music")


@dataclass(frozen=True)
class Facets:
    """What a catalogue's anime can be filtered on: casefolded value → its usual spelling."""

    genres: dict[str, str]
    types: dict[str, str]
    with_year: int  # anime with a known year

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "Facets":
        def spelled(values) -> dict[str, str]:
            counts = Counter(v for v in values if v)
            out: dict[str, str] = {}
            for value, _ in counts.most_common():  # the most common spelling of each name wins
                out.setdefault(value.casefold(), value)
            return dict(sorted(out.items()))

        return cls(
            genres=spelled(g for gs in frame["genres"] for g in gs),
            types=spelled(frame["type"]),
            with_year=int(frame["year"].notna().sum()),
        )


def _close(value: str, known: dict[str, str]) -> str:
    best = process.extractOne(value, list(known.values()), processor=utils.default_process, score_cutoff=60)
    return f"; did you mean {best[0]!r}?" if best else ""


@dataclass
class FilterProblems:
    unknown: list[tuple[str, str]]  # (field, why): INVALID_ARGUMENT
    known_lists: dict[str, str]  # ErrorInfo metadata for them: known_genres / known_types
    unanswerable: list[tuple[str, str]]  # (field, why): INVALID_ARGUMENT, reason FILTER_UNANSWERABLE


def filter_problems(f: common_pb2.Filters, facets: Facets) -> FilterProblems:
    """What about these filters the catalogue cannot match: unknown genres and types (with the
    closest known one), documented types it has no anime of, year bounds when no anime has a year."""
    out = FilterProblems([], {}, [])
    for name in ("include_genres", "exclude_genres"):
        for i, g in enumerate(getattr(f, name)):
            if g.strip() and g.strip().casefold() not in facets.genres:
                out.unknown.append((f"options.filters.{name}[{i}]", f"unknown genre {g!r}{_close(g, facets.genres)}"))
                out.known_lists["known_genres"] = ", ".join(facets.genres.values())
    documented = {t.casefold() for t in DOCUMENTED_TYPES}
    for i, t in enumerate(f.types):
        folded = t.strip().casefold()
        if not folded or folded in facets.types:
            continue
        if folded in documented:
            out.unanswerable.append(
                (
                    f"options.filters.types[{i}]",
                    f"no anime of type {t!r} in this catalogue (its types: {', '.join(facets.types.values())})",
                )
            )
        else:
            out.unknown.append((f"options.filters.types[{i}]", f"unknown type {t!r}{_close(t, facets.types)}"))
            out.known_lists["known_types"] = ", ".join(facets.types.values())
    reversed_years = f.HasField("year_min") and f.HasField("year_max") and f.year_min > f.year_max
    if not facets.with_year and not reversed_years:  # reversed bounds are malformed whatever the catalogue
        out.unanswerable += [
            (
                f"options.filters.{name}",
                "no anime in this catalogue has a known year, so a year filter matches nothing: leave it out",
            )
            for name in ("year_min", "year_max")
            if f.HasField(name)
        ]
    return out


def unknown_values_error(invalid: list[tuple[str, str]], known_lists: dict[str, str]) -> ServiceError:
    """INVALID_ARGUMENT for every bad field of a request, the catalogue's genres or types appended."""
    lists = "; ".join(f"{k.removeprefix('known_')}: {v}" for k, v in known_lists.items())
    message = "; ".join(f"{field}: {why}" for field, why in invalid) + f" (the catalogue's {lists})"
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
        [
            _bad_request(invalid),
            error_details_pb2.ErrorInfo(reason="UNKNOWN_FILTER_VALUE", domain=DOMAIN, metadata=known_lists),
        ],
    )


def unanswerable_error(problems: list[tuple[str, str]]) -> ServiceError:
    """INVALID_ARGUMENT for every bad field of a request, among them a filter the catalogue cannot answer."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "; ".join(f"{f}: {why}" for f, why in problems),
        [_bad_request(problems), error_details_pb2.ErrorInfo(reason="FILTER_UNANSWERABLE", domain=DOMAIN)],
    )


def _bad_request(violations: list[tuple[str, str]]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
