"""TrackerConfig: defaults, validation at construction, and the TRACKER_* environment."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from tracker import ConfigError, ReputationParams, TrackerConfig
from tracker.cli._common import unknown_variables, unless_in_env
from tracker.db import pg_server_settings
from tracker.gossip.config import GossipConfig
from tracker.service.settings import ServiceSettings


def test_defaults_match_the_design() -> None:
    config = TrackerConfig()
    assert config.database_url.startswith("sqlite+aiosqlite:///")
    assert (config.update_interval, config.peer_timeout) == (30.0, 300.0)
    assert (config.min_reputation, config.reliable_threshold, config.bandwidth_window) == (0.3, 0.8, 10)
    assert config.auto_migrate


def test_durations_accept_timedelta() -> None:
    assert TrackerConfig(peer_timeout=timedelta(minutes=2)).peer_timeout == 120.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("peer_timeout", 0),
        ("peer_timeout", -1),
        ("update_interval", float("nan")),
        ("lease_ttl_s", True),
        ("lease_ttl_s", "60"),
        ("tombstone_ttl_s", timedelta(0)),
        ("min_reputation", 1.5),
        ("bandwidth_window", 0),
        ("bandwidth_window", 2.5),
        ("database_url", "mysql://x"),
        ("clock", 5),
        ("max_batch_events", 0),
        ("max_concurrent_selections", 0),
        ("max_concurrent_selections", True),
        ("heartbeat_resolution_s", -1),
        ("heartbeat_resolution_s", 151),  # more than half of peer_timeout (300)
        ("heartbeat_resolution_s", float("inf")),
        ("heartbeat_resolution_s", True),
        ("snapshot_interval_s", -1),
        ("snapshot_interval_s", "hourly"),
        ("max_event_age_s", 0),
        ("max_event_age_s", float("nan")),
        ("pg_lock_timeout_s", -1),
        ("pg_lock_timeout_s", float("inf")),
        ("pg_lock_timeout_s", True),
        ("pg_lock_timeout_s", "30s"),
        ("pg_connect_timeout_s", 0),
        ("pg_connect_timeout_s", float("nan")),
    ],
)
def test_invalid_values_raise_a_clear_error(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrackerConfig(**{field: value})  # type: ignore[arg-type]


def test_reputation_params_are_validated() -> None:
    with pytest.raises(ConfigError, match="outcome_half_life"):
        ReputationParams(outcome_half_life=0)
    with pytest.raises(ConfigError, match="uptime_floor"):
        ReputationParams(uptime_floor=2)


def test_from_env_reads_tracker_variables() -> None:
    env = {
        "TRACKER_DATABASE_URL": "postgresql+asyncpg://u@h/db",
        "TRACKER_PEER_TIMEOUT": "120",
        "TRACKER_BANDWIDTH_WINDOW": "5",
        "TRACKER_AUTO_MIGRATE": "false",
        "TRACKER_REPUTATION_MIN_OUTCOMES": "3",
    }
    config = TrackerConfig.from_env(env)
    assert config.database_url == "postgresql+asyncpg://u@h/db"
    assert (config.peer_timeout, config.bandwidth_window, config.auto_migrate) == (120.0, 5, False)
    assert config.reputation.min_outcomes == 3.0


def test_concurrent_selections_default_to_half_the_pool() -> None:
    assert TrackerConfig().selection_slots == 2  # pool_size 5
    assert TrackerConfig(pool_size=1).selection_slots == 1
    assert TrackerConfig(pool_size=8, max_concurrent_selections=6).selection_slots == 6
    env = {"TRACKER_MAX_CONCURRENT_SELECTIONS": "3"}
    assert TrackerConfig.from_env(env).max_concurrent_selections == 3


def test_the_event_age_limit_follows_outcome_retention_unless_set() -> None:
    """QA: a fixed 7 days refused outcomes that a 30-day outcome retention would have kept."""
    assert TrackerConfig().event_age_limit == 7 * 86_400
    assert TrackerConfig(outcome_retention_s=30 * 86_400).event_age_limit == 30 * 86_400
    assert TrackerConfig(max_event_age_s=timedelta(hours=1)).event_age_limit == 3600
    assert TrackerConfig.from_env({"TRACKER_MAX_EVENT_AGE_S": "600"}).event_age_limit == 600


def test_from_env_names_the_bad_variable() -> None:
    with pytest.raises(ConfigError, match="TRACKER_PEER_TIMEOUT"):
        TrackerConfig.from_env({"TRACKER_PEER_TIMEOUT": "soon"})
    # An override (a command-line option) wins without the variable being read.
    assert TrackerConfig.from_env({"TRACKER_PEER_TIMEOUT": "soon"}, peer_timeout=10).peer_timeout == 10


def test_heartbeat_resolution_is_seconds_bounded_by_the_timeout() -> None:
    assert TrackerConfig().heartbeat_resolution_s == 0.0  # every heartbeat travels by default
    assert TrackerConfig(heartbeat_resolution_s=timedelta(minutes=1)).heartbeat_resolution_s == 60.0
    assert TrackerConfig(peer_timeout=120, heartbeat_resolution_s=60).heartbeat_resolution_s == 60.0
    with pytest.raises(ConfigError, match=r"heartbeat_resolution_s .*\(0 to 60\)"):
        TrackerConfig(peer_timeout=120, heartbeat_resolution_s=61)
    env = {"TRACKER_HEARTBEAT_RESOLUTION_S": "90"}
    assert TrackerConfig.from_env(env).heartbeat_resolution_s == 90.0


def test_snapshots_default_to_one_per_five_minutes() -> None:
    assert TrackerConfig().snapshot_interval_s == 300.0
    assert TrackerConfig(snapshot_interval_s=0).snapshot_interval_s == 0.0  # every pass
    assert TrackerConfig(snapshot_interval_s=timedelta(hours=1)).snapshot_interval_s == 3600.0
    assert TrackerConfig.from_env({"TRACKER_SNAPSHOT_INTERVAL_S": "60"}).snapshot_interval_s == 60.0


def test_postgres_lock_waits_are_bounded_unless_set_to_zero() -> None:
    assert TrackerConfig().pg_lock_timeout_s == 30.0
    assert TrackerConfig(pg_lock_timeout_s=timedelta(seconds=5)).pg_lock_timeout_s == 5.0
    assert TrackerConfig.from_env({"TRACKER_PG_LOCK_TIMEOUT_S": "0.3"}).pg_lock_timeout_s == 0.3
    assert TrackerConfig.from_env({"TRACKER_PG_LOCK_TIMEOUT_S": "0"}).pg_lock_timeout_s == 0.0
    with pytest.raises(ConfigError, match="TRACKER_PG_LOCK_TIMEOUT_S"):
        TrackerConfig.from_env({"TRACKER_PG_LOCK_TIMEOUT_S": "30s"})


@pytest.mark.parametrize(
    ("seconds", "sent"),
    [(30.0, "30000ms"), (0.3, "300ms"), (0.0001, "1ms"), (0, None)],  # 0 ms would mean no limit
)
def test_the_lock_timeout_goes_to_postgres_in_whole_milliseconds(seconds: float, sent: str | None) -> None:
    settings = pg_server_settings(TrackerConfig(pg_lock_timeout_s=seconds))
    assert settings.get("lock_timeout") == sent and settings["jit"] == "off"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:8751", "looks like http://"),
        ("http://127.0.0.1:8751/v1/gossip", "without /v1/gossip"),  # answered 404 at every round
        ("http://127.0.0.1:8751/v1/gossip/", "without /v1/gossip"),
        ("http://127.0.0.1:8751?x=1", "looks like http://"),
        # Refused at the first round, in its task group, with "unhandled errors in a TaskGroup" (QA 74).
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://[::1", "Invalid IPv6 URL"),
    ],
)
def test_a_gossip_neighbour_is_a_base_url(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GossipConfig(keys=("k" * 16,), neighbors=(url,))
    assert GossipConfig(keys=("k" * 16,), neighbors=("http://127.0.0.1:8751/",)).neighbors == (
        "http://127.0.0.1:8751/",
    )


def test_gossip_neighbours_without_a_key_are_refused() -> None:
    with pytest.raises(ConfigError, match="TRACKER_GOSSIP_KEYS"):
        GossipConfig(neighbors=("http://127.0.0.1:8751",))
    assert not GossipConfig().enabled  # no key and no neighbours: gossip simply off


def test_a_page_size_the_listing_would_refuse_is_refused_at_start() -> None:
    """``/openapi.json`` advertised 20,000 and ``/v1/peers?limit=15000`` answered 422 (QA round 11)."""
    from tracker.service.settings import ServiceSettings

    assert ServiceSettings(max_page_size=10_000).max_page_size == 10_000
    with pytest.raises(ConfigError, match=r"max_page_size must be at most 10000"):
        ServiceSettings(max_page_size=10_001)


def _settings_read() -> frozenset[str]:
    return TrackerConfig.env_names() | ServiceSettings.env_names() | GossipConfig.env_names()


def test_a_misspelt_variable_is_named_with_the_setting_it_likely_meant() -> None:
    """``TRACKER_PEER_TIMOUT=60`` was ignored without a word: peers kept the 300 s default (QA round 16)."""
    environ = {
        "TRACKER_PEER_TIMOUT": "60",
        "TRACKER_PEER_TIMEOUT": "60",
        "TRACKER_GOSSIP_KEYS": "k" * 16,
        "TRACKER_REPUTATION_MIN_OUTCOMES": "3",
        "TRACKER_REQUIRE_POSTGRES": "1",
        "TRACKER_NONSENSE": "x",
        "PATH": "/bin",
    }
    assert unknown_variables(_settings_read(), environ) == [
        "TRACKER_NONSENSE is set, but no setting of this tracker has that name: ignored",
        "TRACKER_PEER_TIMOUT is set, but no setting of this tracker has that name: ignored "
        "(did you mean TRACKER_PEER_TIMEOUT?)",
    ]


def test_every_variable_the_docs_name_is_one_a_setting_reads() -> None:
    """The names ``serve`` knows are those the settings read; the docs name no other."""
    root = Path(__file__).resolve().parent.parent
    named = set()
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        named |= set(re.findall(r"TRACKER_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text(encoding="utf-8")))
    named.discard("TRACKER_PEER_TIMOUT")  # operations.md's example of a misspelling
    assert unknown_variables(_settings_read(), dict.fromkeys(named, "")) == []


def test_the_database_password_is_never_shown() -> None:
    """repr() and the URL errors printed it (QA round 22; `tracker stats` showed it in the terminal)."""
    config = TrackerConfig(database_url="postgresql+asyncpg://tracker:s3cr3t-pw@127.0.0.1/tracker")
    assert "s3cr3t-pw" not in repr(config) and "tracker:***@127.0.0.1" in repr(config)
    unencoded = TrackerConfig(database_url="postgresql+asyncpg://app:s3cr3t@Pa55@db.internal/tracker")
    assert "s3cr3t" not in repr(unencoded) and "Pa55" not in repr(unencoded)  # QA round 23
    assert repr(config).startswith("TrackerConfig(database_url=") and "peer_timeout=300.0" in repr(config)
    for url in (
        "postgresql://tracker:s3cr3t-pw@127.0.0.1/tracker",
        "tracker:s3cr3t-pw@127.0.0.1/db",
        "postgresql+asyncpg://app:s3cr3t-pw@Pa55:w0rd@db.internal:5x/tracker",  # "@" and ":" unencoded
    ):
        with pytest.raises(ConfigError) as refused:
            TrackerConfig(database_url=url)
        shown = set(re.split(r"[^\w-]", str(refused.value)))
        assert not {"s3cr3t-pw", "Pa55", "w0rd"} & shown, refused.value


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite+aiosqlite://", "in-memory SQLite"),
        ("sqlite+aiosqlite:///:memory:", "in-memory SQLite"),
        ("sqlite+aiosqlite:///file:shared?mode=memory&cache=shared&uri=true", "in-memory SQLite"),
        ("postgresql+asyncpg://u@127.0.0.1/db?sslmode=require", "asyncpg spells it ssl"),
        ("postgresql+asyncpg://u@127.0.0.1/db?connect_timeout=5", "pg_connect_timeout_s"),
        ("postgresql+asyncpg://u@127.0.0.1/db?application_name=x", "ALTER ROLE"),
        ("postgresql+asyncpg://u@127.0.0.1/db?frobnicate=1", "the URL may carry"),
        # asyncpg connected to the database named after the user, and the tables went there (QA 56).
        ("postgresql+asyncpg://u@127.0.0.1:5432", "names no database"),
        ("postgresql+asyncpg://u@127.0.0.1/", "names no database"),
        ("postgresql+asyncpg://", "names no database"),
        # SQLAlchemy warned and ignored `mode=ro` (the file opened read-write), and cut a path at a
        # `?` without a word (QA round 56).
        ("sqlite+aiosqlite:///t.db?mode=ro", "takes no options"),
        ("sqlite+aiosqlite:////tmp/q?x.db", "is written %3F"),
    ],
)
def test_a_database_the_tracker_cannot_open_is_refused_when_configured(url: str, says: str) -> None:
    """In-memory SQLite failed only at open, as a StorageError that callers retry; a Postgres option
    asyncpg does not take escaped open() as a bare TypeError (QA round 22)."""
    with pytest.raises(ConfigError, match=re.escape(says)):
        TrackerConfig(database_url=url)


def test_a_question_mark_in_a_sqlite_file_name_is_written_escaped(tmp_path: Path) -> None:
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path}/q%3Fx.db")
    assert config.dialect == "sqlite"


@pytest.mark.parametrize("value", ["ture", "y", "enabled"])
def test_a_gossip_on_off_variable_that_is_neither_is_refused(value: str) -> None:
    """Anything but a yes turned learn_neighbors off without a word; every other on/off variable
    refused it (QA round 56)."""
    with pytest.raises(ConfigError, match=f"TRACKER_GOSSIP_LEARN_NEIGHBORS={value!r} is not valid"):
        GossipConfig.from_env({"TRACKER_GOSSIP_LEARN_NEIGHBORS": value})
    assert GossipConfig.from_env({"TRACKER_GOSSIP_LEARN_NEIGHBORS": " On "}).learn_neighbors
    assert not GossipConfig.from_env({"TRACKER_GOSSIP_LEARN_NEIGHBORS": "0"}).learn_neighbors
    assert not GossipConfig.from_env({"TRACKER_GOSSIP_LEARN_NEIGHBORS": ""}).learn_neighbors  # unset


def test_an_empty_variable_is_unset_for_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """`TRACKER_AUTO_MIGRATE=''` was "not a valid bool", `TRACKER_LOG_JSON=''` no, and
    `TRACKER_GOSSIP_LEARN_NEIGHBORS=''` unset (QA round 58 D3): empty (`${X:-}` in a unit file) or
    blank is unset, whatever the setting's type."""
    for blank in ("", "  "):
        tracker_env = dict.fromkeys(TrackerConfig.env_names(), blank)
        assert TrackerConfig.from_env(tracker_env) == TrackerConfig()
        gossip_env = dict.fromkeys(GossipConfig.env_names(), blank)
        assert GossipConfig.from_env(gossip_env) == GossipConfig()
        service_env = dict.fromkeys(ServiceSettings.env_names(), blank)
        assert ServiceSettings.from_env(service_env) == ServiceSettings()
    assert (
        TrackerConfig.from_env({"TRACKER_AUTO_MIGRATE": "", "TRACKER_RUN_SWEEPER": "no"}).run_sweeper is False
    )
    # A command's own default (serve's run_sweeper=True over the library's) yields only to a value.
    monkeypatch.setenv("TRACKER_RUN_SWEEPER", " ")
    monkeypatch.setenv("TRACKER_AUTO_MIGRATE", "false")
    assert unless_in_env(run_sweeper=True, auto_migrate=True) == {"run_sweeper": True}


def test_the_api_token_and_gossip_keys_are_not_in_reprs() -> None:
    """`TrackerConfig` masked its database password since QA round 22; the token and the gossip keys
    printed in full wherever a settings object was shown (pytest, a debugger, an embedder's log: QA
    round 68)."""
    token, key = "token-0123456789abcdef", "gossip-key-0123456789"
    shown = repr(ServiceSettings(api_token=token)) + repr(GossipConfig(keys=(key,)))
    assert token not in shown and key not in shown, shown


def test_postgres_url_options_asyncpg_takes_are_accepted() -> None:
    options = "ssl=require&target_session_attrs=primary&prepared_statement_cache_size=500"
    config = TrackerConfig(database_url=f"postgresql+asyncpg://u@127.0.0.1/db?{options}")
    assert config.dialect == "postgresql"


@pytest.mark.parametrize("name", ["auto_migrate", "pg_transaction_pooling", "run_sweeper", "echo_sql"])
@pytest.mark.parametrize("value", ["no", "false", 1, 0, None])
def test_on_off_settings_take_only_true_or_false(name: str, value: object) -> None:
    """run_sweeper="no" started the sweeper and auto_migrate="false" migrated (QA round 22)."""
    with pytest.raises(ConfigError, match=f"{name} must be True or False"):
        TrackerConfig(**{name: value})  # type: ignore[arg-type]
