"""peer-tracker: which peers are online, how good they are, what they hold, and whom to download from."""

from importlib.metadata import PackageNotFoundError, version

from .config import TrackerConfig
from .core import AvailabilityTracker
from .errors import (
    CommitOutcomeUnknown,
    ConfigError,
    InvalidInput,
    SchemaOutOfDate,
    StorageError,
    TrackerClosed,
    TrackerError,
    TransientStorageError,
    UnstorableInput,
    WrongEventLoop,
)
from .events import (
    ContentAvailable,
    ContentUnavailable,
    Event,
    PeerOffline,
    PeerOnline,
    SpeedSample,
    UploadOutcome,
)
from .heavy import RankingLoad
from .ingest import GroupStats
from .models import ContentAvailability, PeerInfo, PeerMetrics, TrackerStats
from .reputation import ReputationParams
from .sweeper import SweepReport, SweepState

try:
    __version__ = version("peer-tracker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AvailabilityTracker",
    "CommitOutcomeUnknown",
    "ConfigError",
    "ContentAvailability",
    "ContentAvailable",
    "ContentUnavailable",
    "Event",
    "GroupStats",
    "InvalidInput",
    "PeerInfo",
    "PeerMetrics",
    "PeerOffline",
    "PeerOnline",
    "RankingLoad",
    "ReputationParams",
    "SchemaOutOfDate",
    "SpeedSample",
    "StorageError",
    "SweepReport",
    "SweepState",
    "TrackerClosed",
    "TrackerConfig",
    "TrackerError",
    "TrackerStats",
    "TransientStorageError",
    "UnstorableInput",
    "UploadOutcome",
    "WrongEventLoop",
]
