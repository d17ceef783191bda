"""Hostile MyAnimeList uploads over a real socket (issue 14, items 2 and 5).

- The element bomb: a 4 KB gzip of `<myanimelist>` and 1.39 million unclosed `<a>` tags, under the
  4 MiB decompressed limit. It must be refused with a precise status while the gateway's peak memory
  (VmHWM of the gateway process, read from /proc) grows by less than MAX_GROWTH_MIB; unfixed, one
  such upload built a tree of ~400 MiB.
- A huge but legal document (600,000 empty elements) is read in bounded memory too.
- An XML declaration naming an encoding Python's codec registry cannot use (utf-7, rot13, foo-bar)
  is INVALID_ARGUMENT naming `mal_xml` and the encoding; unfixed it was INTERNAL.
"""

from __future__ import annotations

import gzip
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import gateway_pb2
from tests.security.gateway_stack import READER, auth, start_gateway

C = grpc.StatusCode
MAX_GROWTH_MIB = 50
DEEP_BOMB = gzip.compress(b"<myanimelist>" + b"<a>" * 1_390_000, 9)
WIDE = gzip.compress(b"<myanimelist>" + b"<a/>" * 600_000 + b"</myanimelist>", 9)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw, stop = start_gateway(tmp_path_factory.mktemp("mal"))
    yield gw
    stop()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def import_list(gw, mal_xml: bytes) -> ErrorDetails | None:
    try:
        gw.stub.ImportMalList(gateway_pb2.ImportMalListRequest(mal_xml=mal_xml), metadata=auth(READER), timeout=60)
        return None
    except grpc.RpcError as e:
        return ErrorDetails.from_rpc_error(e)


def test_the_element_bomb_is_refused_in_bounded_memory(gateway):
    assert len(DEEP_BOMB) < 5_000
    before = peak_rss_mib(gateway.pid)
    error = import_list(gateway, DEEP_BOMB)
    growth = peak_rss_mib(gateway.pid) - before
    print(f"\nelement bomb: peak RSS {before:.0f} → {before + growth:.0f} MiB")
    assert error is not None and error.code == C.INVALID_ARGUMENT, error
    assert "nested more than 8 deep" in error.field_violations["mal_xml"]
    assert growth < MAX_GROWTH_MIB, f"one {len(DEEP_BOMB):,}-byte upload took {growth:.0f} MiB"


def test_several_bombs_at_once_stay_bounded(gateway):
    before = peak_rss_mib(gateway.pid)
    with futures.ThreadPoolExecutor(6) as pool:
        errors = list(pool.map(lambda _: import_list(gateway, DEEP_BOMB), range(6)))
    growth = peak_rss_mib(gateway.pid) - before
    assert {e.code for e in errors} == {C.INVALID_ARGUMENT}
    assert growth < 2 * MAX_GROWTH_MIB, f"six uploads took {growth:.0f} MiB"


def test_a_huge_but_legal_document_is_read_in_bounded_memory(gateway):
    before = peak_rss_mib(gateway.pid)
    error = import_list(gateway, WIDE)
    growth = peak_rss_mib(gateway.pid) - before
    assert error is not None and error.code == C.INVALID_ARGUMENT
    assert "no usable favourite among 0 entries" in error.field_violations["mal_xml"]
    assert growth < MAX_GROWTH_MIB, f"a legal {len(WIDE):,}-byte upload took {growth:.0f} MiB"


def test_too_many_entries_is_resource_exhausted_with_its_reason(gateway):
    entries = b"".join(b"<anime><series_animedb_id>%d</series_animedb_id></anime>" % (i + 1) for i in range(20_001))
    error = import_list(gateway, gzip.compress(b"<myanimelist>" + entries + b"</myanimelist>"))
    assert (error.code, error.reason) == (C.RESOURCE_EXHAUSTED, "MAL_XML_TOO_LARGE")
    assert "more than 20,000 entries" in error.message


@pytest.mark.parametrize("encoding", ["utf-7", "rot13", "foo-bar", "utf-32", "idna"])
def test_an_unusable_declared_encoding_is_invalid_argument(gateway, encoding):
    error = import_list(gateway, f'<?xml version="1.0" encoding="{encoding}"?><myanimelist/>'.encode())
    assert error is not None and error.code == C.INVALID_ARGUMENT, error
    assert encoding in error.field_violations["mal_xml"] and "encoding" in error.field_violations["mal_xml"]


def test_a_utf8_export_still_imports(gateway):
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><myanimelist><anime><series_animedb_id>20</series_animedb_id>'
        "<my_score>9</my_score><my_status>Completed</my_status></anime></myanimelist>"
    ).encode()
    resp = gateway.stub.ImportMalList(gateway_pb2.ImportMalListRequest(mal_xml=xml), metadata=auth(READER), timeout=60)
    assert [f.anime_id for f in resp.favourites] == [20] and resp.recommendations
