"""Gateway pieces without sockets: the catalogue snapshot and its refresh rules, error field
renaming, deadlines, API-key checks, and the local runner's key file. (Everything over real
sockets is in tests/e2e.)"""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from google.rpc import error_details_pb2

from anime2vec.runlocal import api_key_env
from anime2vec.serving.errors import ServiceError, already_exists, invalid_argument, not_found
from anime2vec.v1 import common_pb2, gateway_pb2, ranker_pb2
from services.gateway.auth import DEFAULT_SCOPES, METHOD_SCOPES, SCOPES, ApiKey, ApiKeyInterceptor, load_api_keys
from services.gateway.catalog import CatalogueSync
from services.gateway.downstream import deadline
from services.gateway.service import TextVectors, _Problems
from services.gateway.settings import GatewaySettings, balanced_target


def entry(anime_id: int, title: str, **kw) -> ranker_pb2.CatalogEntry:
    return ranker_pb2.CatalogEntry(anime_id=anime_id, title=title, **kw)


class FakeRanker:
    """ModelInfo and ListCatalog pages as a ranker would serve them (page size 2)."""

    def __init__(self, version: str, entries: list[ranker_pb2.CatalogEntry]):
        self.version, self.entries, self.pages_served = version, entries, 0
        self.switch_after_first_page: str | None = None

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(version=self.version, n_items=len(self.entries))

    def page(self, token: str) -> ranker_pb2.ListCatalogResponse:
        offset = int(token or 0)
        self.pages_served += 1
        resp = ranker_pb2.ListCatalogResponse(
            entries=self.entries[offset : offset + 2],
            model_version=self.version,
            next_page_token=str(offset + 2) if offset + 2 < len(self.entries) else "",
        )
        if self.switch_after_first_page:
            self.version, self.switch_after_first_page = self.switch_after_first_page, None
        return resp


@pytest.fixture
def ranker():
    return FakeRanker(
        "v1",
        [
            entry(20, "Naruto", members=500, type="TV"),
            entry(269, "Bleach", members=400),
            entry(121, "Fullmetal Alchemist", synonyms=["FMA"], year=2003, genres=["Action"]),
        ],
    )


def test_catalogue_rebuilds_only_when_version_or_size_changes(ranker):
    loaded = []
    sync = CatalogueSync(ranker.info, ranker.page, poll_s=60, on_loaded=lambda info: loaded.append(info.version))
    with pytest.raises(ServiceError) as e:
        sync.get()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert sync.refresh_if_changed() and ranker.pages_served == 2 and loaded == ["v1"]
    cat = sync.get()
    assert cat.index.resolve("fma").anime_id == 121 and cat.title(121) == "Fullmetal Alchemist"
    assert cat.facets(121)["year"] == 2003 and cat.facets(20)["year"] is None
    assert not sync.refresh_if_changed() and ranker.pages_served == 2  # nothing changed
    ranker.entries.append(entry(1, "Cowboy Bebop"))  # added through another replica
    assert sync.refresh_if_changed() and sync.get().index.resolve("Cowboy Bebop").anime_id == 1
    ranker.version = "v2"  # a promotion
    assert sync.refresh_if_changed() and sync.get().version == "v2" and loaded == ["v1", "v1", "v2"]


def test_a_version_switch_while_paging_keeps_the_old_snapshot(ranker):
    sync = CatalogueSync(ranker.info, ranker.page, poll_s=60)
    sync.refresh_if_changed()
    before = sync.get()
    ranker.version = "v2"
    ranker.switch_after_first_page = "v3"
    with pytest.raises(RuntimeError, match="changed from v2 to v3"):
        sync.refresh_if_changed()
    assert sync.get() is before


def test_an_added_anime_resolves_at_once_and_keeps_a_replaced_ones_popularity(ranker):
    sync = CatalogueSync(ranker.info, ranker.page, poll_s=60)
    sync.refresh_if_changed()
    sync.add(entry(100_000_000, "Saltwind Corsairs", title_english="Corsairs of the Salt Wind"), "v1")
    assert sync.get().index.resolve("corsairs of the salt wind").anime_id == 100_000_000
    sync.add(entry(20, "Naruto (retold)"), "v1")  # replaces id 20, members 0
    assert sync.get().facets(20)["members"] == 500 and sync.get().title(20) == "Naruto (retold)"
    sync.add(entry(7, "Other version's anime"), "v9")  # not this snapshot's version
    assert 7 not in sync.get()


def test_renamed_maps_whole_paths_and_recomposes_the_message_without_reading_text():
    """The gateway relays the ranker's field errors in its caller's terms: paths are looked up whole
    (liked_ids[1] never matches inside liked_ids[10]), descriptions are not searched."""
    error = not_found("anime", "5", reason="ANIME_NOT_FOUND", field="liked_ids[10]", suggestions=["Naruto"])
    assert error.message == "liked_ids[10]: anime '5' not found; did you mean: 'Naruto'?"
    renamed = error.renamed({"liked_ids[1]": "favourites[0].title", "liked_ids[10]": "favourites[12].anime_id"})
    assert renamed.message == "favourites[12].anime_id: anime '5' not found; did you mean: 'Naruto'?"
    assert renamed.code == grpc.StatusCode.NOT_FOUND
    by_type = {type(d).__name__: d for d in renamed.details}
    assert [(v.field, v.description) for v in by_type["BadRequest"].field_violations] == [
        ("favourites[12].anime_id", "anime '5' not found; did you mean: 'Naruto'?")
    ]
    assert by_type["ErrorInfo"].reason == "ANIME_NOT_FOUND" and by_type["ResourceInfo"].resource_name == "5"

    several = invalid_argument([("liked_ids[1]", "see liked_ids[10]"), ("options.limit", "too big")])
    renamed = several.renamed({"liked_ids[1]": "favourites[0].title"})
    assert renamed.message == "favourites[0].title: see liked_ids[10]; options.limit: too big"
    # a message that is not composed from the violations is the ranker's own sentence: kept
    taken = already_exists("event_id 'e1' was already used", reason="EVENT_ID_REUSED", field="events[0].event_id")
    renamed = taken.renamed({"events[0].event_id": "events[3].event_id"})
    assert renamed.message == "event_id 'e1' was already used"
    assert [v.field for d in renamed.details if hasattr(d, "field_violations") for v in d.field_violations] == [
        "events[3].event_id"
    ]
    assert invalid_argument({"query": "blank"}).renamed({}).message == "query: blank"


class Ctx:
    def __init__(self, remaining: float):
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining


def test_downstream_deadline_never_outlives_the_caller():
    assert deadline(None, 5.0) == 5.0
    assert deadline(Ctx(1e12), 5.0) == 5.0  # grpc's "no deadline"
    assert deadline(Ctx(2.0), 5.0) == pytest.approx(1.95)
    assert deadline(Ctx(60.0), 5.0) == 5.0
    with pytest.raises(ServiceError) as e:
        deadline(Ctx(0.01), 5.0)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_list_of_ranker_addresses_is_one_round_robin_target_of_ip_literals():
    assert balanced_target("ranker:50052") is None and balanced_target("127.0.0.1:50052") is None  # dialled as is
    assert balanced_target("127.0.0.1:50052, 127.0.0.1:50053") == "ipv4:127.0.0.1:50052,127.0.0.1:50053"
    assert balanced_target("[::1]:50052,[::1]:50053") == "ipv6:[::1]:50052,[::1]:50053"
    assert GatewaySettings(api_keys="k", ranker_address="127.0.0.1:1,127.0.0.1:2").ranker_address
    for bad, says in (
        ("ranker-0:50052,ranker-1:50052", "IP:port entries"),
        ("127.0.0.1:50052,", "IP:port entries"),
        ("127.0.0.1,127.0.0.1:50053", "IP:port entries"),
        ("127.0.0.1:50052,127.0.0.1:99999", "IP:port entries"),
        ("::1:50052,::1:50053", r"in brackets, \[::1\]:50052"),
        ("127.0.0.1:50052,[::1]:50053", "all IPv4 or all IPv6"),
    ):
        with pytest.raises(ValueError, match=says):
            GatewaySettings(api_keys="k", ranker_address=bad)


def test_several_unresolved_titles_name_every_field():
    problems = _Problems()
    problems.missing += [("favourites[0].title", "Narutoo Movie 9", ["Naruto"]), ("favourites[2].title", "Zzz", [])]
    with pytest.raises(ServiceError) as e:
        problems.raise_if_any()
    err = e.value
    assert err.code == grpc.StatusCode.NOT_FOUND
    bad = next(d for d in err.details if isinstance(d, error_details_pb2.BadRequest))
    assert [v.field for v in bad.field_violations] == ["favourites[0].title", "favourites[2].title"]
    first = not_found(
        "anime", "Narutoo Movie 9", reason="ANIME_NOT_FOUND", suggestions=["Naruto"], field="favourites[0].title"
    )
    assert err.message == first.message + "; also favourites[2].title: no anime matches 'Zzz'"


def test_api_keys_match_exactly():
    check = ApiKeyInterceptor(["alpha-key", "beta-key"])
    assert check.is_allowed("alpha-key") and check.is_allowed("beta-key")
    assert not any(check.is_allowed(k) for k in ("alpha", "alpha-key ", "ALPHA-KEY", "", "beta-keyx"))
    with pytest.raises(ValueError):
        ApiKeyInterceptor([])


def test_api_key_scopes_are_parsed_and_checked(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# one per line\nfile-key:catalog\n\nplain-file-key\n")
    keys = load_api_keys(
        GatewaySettings(api_keys=" bare , admin:read+feedback+catalog,reader:read ", api_keys_file=keys_file)
    )
    assert {k.key: k.scopes for k in keys} == {
        "bare": DEFAULT_SCOPES,
        "admin": frozenset(SCOPES),
        "reader": {"read"},
        "file-key": {"catalog"},
        "plain-file-key": DEFAULT_SCOPES,
    }
    check = ApiKeyInterceptor(keys)
    assert check.scopes_of("admin") == frozenset(SCOPES) and check.scopes_of("admin:read+feedback+catalog") is None


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ("s3cret-k3y:write", "unknown scope(s) 'write'"),
        ("s3cret-k3y:", "unknown scope(s) ''"),
        (":read", "no key before ':'"),
        ("s3cret-k3y:read,s3cret-k3y:catalog", "different scopes"),
    ],
)
def test_bad_api_key_entries_stop_the_start_without_echoing_the_key(entry, fragment):
    with pytest.raises(ValueError) as e:
        load_api_keys(GatewaySettings(api_keys=entry))
    assert fragment in str(e.value) and "A2V_GATEWAY_API_KEYS" in str(e.value)
    assert "s3cret-k3y" not in str(e.value)


def test_every_gateway_method_has_a_scope():
    methods = {
        f"/anime2vec.v1.GatewayService/{m.name}"
        for m in gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods
    }
    assert set(METHOD_SCOPES) == methods and set(METHOD_SCOPES.values()) == set(SCOPES)
    assert METHOD_SCOPES["/anime2vec.v1.GatewayService/AddAnime"] == "catalog"
    assert ApiKey("k", DEFAULT_SCOPES).scopes == {"read", "feedback"}


def test_text_vectors_keep_the_most_recent_queries():
    cache = TextVectors(2)
    for q in ("a", "b"):
        cache.put(q, [q], "fp")
    cache.get("a")  # a is now the most recent
    cache.put("c", ["c"], "fp")
    assert cache.get("b") is None and cache.get("a") == (["a"], "fp") and cache.get("c") == (["c"], "fp")


def test_local_api_key_is_generated_once_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("A2V_GATEWAY_API_KEYS", raising=False)
    monkeypatch.delenv("A2V_GATEWAY_API_KEYS_FILE", raising=False)
    key_file = tmp_path / "run" / "api-key"
    env, key = api_key_env(key_file)
    assert env == {"API_KEYS_FILE": str(key_file.with_name("gateway-api-keys"))} and len(key) >= 32  # key + scopes
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert api_key_env(key_file) == (env, key)  # reused, not regenerated
    monkeypatch.setenv("A2V_GATEWAY_API_KEYS", "configured")
    assert api_key_env(key_file) == ({}, None)  # configured keys are neither replaced nor printed
