"""SensorFlow Server: takes sensor readings over HTTP, stores them, and streams them live.

A board posts a reading (a sensor id and some measured fields) with its API key. The server
validates it, commits it to the store, pushes it to every WebSocket subscriber and answers 201
with the stored reading. People read the data back as the latest reading, history, buckets or CSV.

Routes:
    POST /api/v1/temperature_reading      one reading (JSON or form)
    POST /api/v1/readings                 a batch of readings (JSON array)
    GET  /api/v1/sensor/{id}/latest       the sensor's latest reading
    GET  /api/v1/sensor/{id}/readings     history as JSON or CSV, raw or in time buckets
    GET  /api/v1/sensors                  every sensor, with silent ones marked
    WS   /ws/sensor_updates               live readings
    GET  /api/v1/health, /api/v1/ping     state, without a key
    GET  /metrics, /openapi.json, /docs   Prometheus metrics and the API description
    GET  /                                the built-in dashboard

Settings come from the environment or a `.env` file; every one has a safe default (see README).
The store is SQLite in WAL mode: one writer commits whatever has accumulated in one transaction.
The two ingest routes and the live route are plain ASGI in front of Starlette: every reading and
every subscriber takes them, so they skip the framework's routing and request objects.
With INFLUX_HOST set, that SQLite file is a spool in front of InfluxDB 3, and reads ask InfluxDB.

The file reads in the order a reading travels: settings, metrics, readings (parsing and
validation), storage (SQLite, then InfluxDB), live updates, routes, app assembly.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import gc
import hmac
import itertools
import json
import logging
import math
import os
import pickle
import re
import resource
import secrets
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import traceback
from collections import Counter as Tally
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from operator import attrgetter
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote_plus
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import load_dotenv
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

VERSION = "1.0.0"
HERE = Path(__file__).resolve().parent
log = logging.getLogger("sensorflow")


# --- Settings ------------------------------------------------------------------------------

DEFAULT_FIELDS = "temperature,humidity,pressure"
# Wide enough for freezers and thermocouples, narrow enough to refuse the error values
# boards send (-999, 0 hPa from an unwired barometer, 6553.5 from a failed read).
DEFAULT_RANGES = "temperature:-100:1500,humidity:0:100,pressure:>0:20000"
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
RATE = re.compile(r"(\d+)\s*/\s*(second|minute|hour)")
PERIOD_SECONDS = {"second": 1, "minute": 60, "hour": 3600}
IPNetwork = IPv4Network | IPv6Network
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
INFLUX_URL = re.compile(
    r"https?://[^/\s:]+(:\d{1,5})(/.*)?|https?://\[[0-9a-fA-F:]+\]:\d{1,5}(/.*)?"
)
RESERVED_NAMES = {
    "id",
    "sensor_id",
    "timestamp",
    "date_recorded",
    "time_recorded",
    "clock",
    "client_ip",
    "readings",
}


class SettingsError(ValueError):
    """A setting that cannot be used; the server refuses to start and says which."""


@dataclass(frozen=True)
class FieldRange:
    low: float
    high: float
    low_inclusive: bool = True

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and value <= self.high

    def describe(self) -> str:
        opening = "from" if self.low_inclusive else "above"
        return f"{opening} {self.low:g} to {self.high:g}"


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    sqlite_path: Path
    api_keys: tuple[str, ...]
    ws_keys: tuple[str, ...]
    fields: tuple[str, ...]
    ranges: dict[str, FieldRange]
    max_body_bytes: int
    max_batch: int
    max_ws_per_key: int
    ws_queue_size: int
    timezone: ZoneInfo
    log_level: str
    rate_limit: tuple[int, float] | None  # (burst, requests per second), None when off
    trusted_proxies: tuple[IPNetwork, ...]
    request_timeout: float
    cors_origins: tuple[str, ...]
    metrics_public: bool
    influx_host: str
    influx_token: str
    influx_database: str
    influx_measurement: str
    influx_write_timeout: float


def split_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def read_bool(env: dict[str, str], name: str) -> bool:
    text = env.get(name, "").strip().lower()
    if text not in ("", "true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name} must be true or false (or yes/no, 1/0), got {text!r}")
    return text in ("true", "1", "yes")


def read_int(
    env: dict[str, str], name: str, default: int, minimum: int = 1, maximum: int = 2**31
) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name} must be from {minimum} to {maximum}, got {value}")
    return value


def parse_ranges(text: str) -> dict[str, FieldRange]:
    """Parse `name:low:high` entries; a low bound written `>0` excludes the bound itself."""
    ranges = {}
    for entry in split_list(text):
        parts = entry.split(":")
        if len(parts) != 3:
            raise SettingsError(f"FIELD_RANGES entry {entry!r} is not name:low:high")
        name, low, high = (part.strip() for part in parts)
        exclusive = low.startswith(">")
        try:
            bounds = FieldRange(float(low.lstrip(">")), float(high), not exclusive)
        except ValueError:
            raise SettingsError(f"FIELD_RANGES entry {entry!r}: a bound is not a number") from None
        if not bounds.low < bounds.high:
            raise SettingsError(f"FIELD_RANGES entry {entry!r}: low must be below high")
        ranges[name] = bounds
    return ranges


def parse_rate(text: str) -> tuple[int, float] | None:
    """`600/minute` allows bursts of 600 and refills at 10 per second; empty turns it off."""
    if not text.strip():
        return None
    match = RATE.fullmatch(text.strip().lower())
    if not match or int(match[1]) == 0:
        raise SettingsError(
            f"RATE_LIMIT {text!r} is not a number above 0, a slash and second, minute or hour"
            " (such as 600/minute)"
        )
    count = int(match[1])
    return count, count / PERIOD_SECONDS[match[2]]


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Proxy addresses or networks (`10.0.0.0/8`); `*` trusts every peer."""
    if text.strip() == "*":
        return (ip_network("0.0.0.0/0"), ip_network("::/0"))
    try:
        return tuple(ip_network(item, strict=False) for item in split_list(text))
    except ValueError as error:
        raise SettingsError(f"FORWARDED_ALLOW_IPS: {error}") from None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read every setting once, from the environment and an optional `.env` file."""
    if env is None:
        load_dotenv(Path.cwd() / ".env")
        env = dict(os.environ)

    fields = split_list(env.get("FIELDS", "") or DEFAULT_FIELDS)
    for name in fields:
        if name in RESERVED_NAMES:
            raise SettingsError(f"FIELDS: {name!r} is a reserved name; choose another")
        if not FIELD_NAME.fullmatch(name):
            raise SettingsError(f"FIELDS: {name!r} must be lowercase letters, digits and _")
    own_ranges = parse_ranges(env.get("FIELD_RANGES", ""))
    for name in own_ranges:
        if name not in fields:
            raise SettingsError(f"FIELD_RANGES names {name!r}, which is not in FIELDS")
    ranges = parse_ranges(DEFAULT_RANGES) | own_ranges

    log_level = (env.get("LOG_LEVEL", "").strip() or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    influx_host = env.get("INFLUX_HOST", "").strip()
    if influx_host and not INFLUX_URL.fullmatch(influx_host):
        raise SettingsError("INFLUX_HOST must be a URL with its port, like http://127.0.0.1:8181")

    zone_name = env.get("TIMEZONE", "").strip() or "UTC"
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"TIMEZONE {zone_name!r} is not a known time zone") from None

    for name in ("API_KEY", "API_KEY_WS"):
        if env.get(name, "").strip() and not split_list(env[name]):
            raise SettingsError(f"{name} holds no key, only commas and spaces")
    api_keys = split_list(env.get("API_KEY", ""))
    return Settings(
        host=env.get("HOST", "").strip() or "0.0.0.0",
        port=read_int(env, "PORT", 8000, maximum=65535),
        sqlite_path=Path(env.get("SQLITE_PATH", "").strip() or "sensorflow.db"),
        api_keys=api_keys,
        ws_keys=split_list(env.get("API_KEY_WS", "")) or api_keys,
        fields=fields,
        ranges={name: ranges[name] for name in fields if name in ranges},
        max_body_bytes=read_int(env, "MAX_BODY_BYTES", 256 * 1024),
        max_batch=read_int(env, "MAX_BATCH", 1000),
        max_ws_per_key=read_int(env, "MAX_WS_CONNECTIONS_PER_KEY", 10),
        ws_queue_size=read_int(env, "WS_QUEUE_SIZE", 1000),
        timezone=zone,
        log_level=log_level,
        rate_limit=parse_rate(env.get("RATE_LIMIT", "")),
        trusted_proxies=parse_networks(env.get("FORWARDED_ALLOW_IPS", "")),
        request_timeout=read_int(env, "REQUEST_TIMEOUT", 10),
        cors_origins=split_list(env.get("CORS_ORIGINS", "")),
        metrics_public=read_bool(env, "METRICS_PUBLIC"),
        influx_host=influx_host,
        influx_token=env.get("INFLUX_TOKEN", "").strip(),
        influx_database=env.get("INFLUX_DATABASE", "").strip() or "sensorflow",
        influx_measurement=env.get("INFLUX_MEASUREMENT", "").strip() or "sensor_readings",
        influx_write_timeout=read_int(env, "INFLUX_WRITE_TIMEOUT", 5),
    )


SHORT_KEY = 16  # characters; a generated key has 48


def ensure_api_key(settings: Settings) -> Settings:
    """Never run open: without a configured key, create one beside the database and reuse it."""
    if settings.api_keys:
        return settings
    key_path = settings.sqlite_path.with_name(settings.sqlite_path.name + ".key")
    if key_path.exists():
        key = key_path.read_text().strip()
        log.info("using the API key saved in %s", key_path)
    else:
        key = secrets.token_hex(24)  # hex: safe in any shell, URL or header
        key_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(key + "\n")
        # Shown once, on the console, so the person who started the server can copy it.
        print(
            f"\nNo API_KEY was set, so one was generated and saved in {key_path}:\n\n    {key}\n\n"
            "Boards send it in the X-API-Key header; WebSocket clients add ?api-key=... .\n",
            file=sys.stderr,
            flush=True,
        )
    keys = (key,)
    return Settings(**{**settings.__dict__, "api_keys": keys, "ws_keys": settings.ws_keys or keys})


# --- Metrics (served at /metrics in the Prometheus text format) ------------------------------

REQUESTS = Counter("sensorflow_requests", "HTTP requests by route and status", ["route", "status"])
LATENCY = Histogram(
    "sensorflow_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
STORED = Counter("sensorflow_readings_stored", "Readings stored")
REJECTED = Counter("sensorflow_readings_rejected", "Ingest requests refused, by reason", ["reason"])
SUBSCRIBERS = Gauge("sensorflow_subscribers", "Live WebSocket subscribers")
DROPPED = Counter("sensorflow_subscribers_dropped", "Subscribers dropped for falling behind")
COMMIT_SECONDS = Histogram(
    "sensorflow_commit_seconds",
    "Time to commit one group of readings",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
)
SPOOL_BACKLOG = Gauge("sensorflow_spool_backlog", "Readings waiting in the spool for InfluxDB")
DELIVERY_FAILURES = Counter("sensorflow_delivery_failures", "Failed deliveries to InfluxDB")
REJECT_REASONS = {
    400: "malformed",
    401: "unauthorized",
    408: "too_slow",
    413: "too_large",
    405: "wrong_method",
    415: "unsupported_type",
    422: "invalid",
    429: "rate_limited",
    503: "store_unavailable",
}


# --- Readings ------------------------------------------------------------------------------

# Not only dots: "." and ".." cannot be written in a URL path.
SENSOR_ID = re.compile(r"(?!\.+\Z)[A-Za-z0-9_.:-]{1,64}")
SENSOR_ID_LENGTH = 64
PLAIN_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
EARLIEST_DEVICE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z: before it, the clock is unset
FUTURE_SLACK_MS = 5 * 60 * 1000
MILLISECONDS_FROM = 100_000_000_000  # a larger epoch number is in milliseconds, not seconds
LARGEST_EPOCH = 10**15  # in milliseconds, the year 33658: a larger number is not a time


class ApiError(Exception):
    """An error a client sees as JSON {"error", "detail"} with a precise status code."""

    def __init__(
        self, status: int, error: str, detail: object = None, headers: dict | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers

    def content(self) -> dict:
        return {"error": self.error, "detail": self.detail}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers or {})
        if self.status in (408, 413):
            headers["Connection"] = "close"  # the rest of the body is not worth waiting for
        return headers


class ReadingError(ValueError):
    """A reading that fails validation; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class Reading:
    """One measurement set from one sensor at one time."""

    __slots__ = ("id", "sensor_id", "values", "ts_ms", "device_clock", "client_ip")

    def __init__(
        self,
        sensor_id: str,
        values: dict[str, float],
        ts_ms: int | None,
        client_ip: str,
        id: int | None = None,
        device_clock: bool = True,
    ) -> None:
        self.id = id
        self.sensor_id = sensor_id
        self.values = values
        self.ts_ms = ts_ms
        self.device_clock = ts_ms is not None and device_clock
        self.client_ip = client_ip

    def as_row(self) -> tuple:
        """What the writer process is sent of a reading (see Reading.from_row)."""
        return self.sensor_id, self.values, self.ts_ms, self.client_ip, self.device_clock

    @classmethod
    def from_row(cls, row: tuple) -> Reading:
        sensor_id, values, ts_ms, client_ip, device_clock = row
        return cls(sensor_id, values, ts_ms, client_ip, device_clock=device_clock)

    def as_dict(self, zone: ZoneInfo) -> dict:
        second, milliseconds = divmod(self.ts_ms, 1000)
        utc, local_date, local_time = second_texts(second, zone)
        return {
            "id": self.id,
            "sensor_id": self.sensor_id,
            **self.values,
            "timestamp": f"{utc}.{milliseconds:03d}Z",
            "date_recorded": local_date,
            "time_recorded": local_time,
            "clock": "device" if self.device_clock else "server",
            "client_ip": self.client_ip,
        }


@functools.lru_cache(maxsize=4096)
def second_texts(second: int, zone: ZoneInfo) -> tuple[str, str, str]:
    """A second as UTC date-time, local date and local time. Readings arrive many per second,
    so this is worked out once per second, not once per reading."""
    local = datetime.fromtimestamp(second, zone)
    utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return utc, local.strftime("%Y-%m-%d"), local.strftime("%H:%M:%S")


def format_timestamp(ms: int) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-12-04T15:33:54.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def parse_number(field: str, value: object, bounds: FieldRange | None) -> float:
    """A JSON number or a plain decimal string, finite and within the field's range."""
    # A JSON number, nearly every value, skips the type questions (a bool is not an int here).
    if type(value) is not float and type(value) is not int:
        value = convertible(field, value)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ReadingError(field, f"{field} must be a finite number")
    if bounds is not None and not bounds.holds(number):
        raise ReadingError(field, f"{field} {number:g} is out of range ({bounds.describe()})")
    return number + 0.0  # turns -0.0 into 0.0


def convertible(field: str, value: object) -> int | float | str:
    """A number or a plain decimal string (stripped) for float(); a boolean is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        kind = "null" if value is None else type(value).__name__
        kind = {"bool": "a boolean", "dict": "an object", "list": "a list"}.get(kind, kind)
        raise ReadingError(field, f"{field} must be a number, not {kind}")
    if isinstance(value, str):
        if not PLAIN_DECIMAL.fullmatch(value.strip()):
            raise ReadingError(field, f"{field} must be a plain decimal number, got {value[:20]!r}")
        value = value.strip()
    return value


def parse_time(name: str, value: object) -> int:
    """An RFC 3339 string, or epoch seconds or milliseconds (told apart by size), as epoch ms."""
    if type(value) is int and MILLISECONDS_FROM <= value <= LARGEST_EPOCH:
        return value  # epoch ms, as most boards send it
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ReadingError(name, f"{name} must be an RFC 3339 string or epoch seconds/ms")
    if isinstance(value, str):
        text = value.strip()
        if PLAIN_DECIMAL.fullmatch(text):
            value = float(text)
        else:
            try:
                moment = datetime.fromisoformat(text.replace("z", "Z"))
            except ValueError:
                raise ReadingError(name, f"{name} {value[:40]!r} is not RFC 3339") from None
            if moment.tzinfo is None:
                raise ReadingError(name, f"{name} needs a time zone offset, such as Z")
            return round(moment.timestamp() * 1000)
    if not abs(value) <= LARGEST_EPOCH:  # also refuses NaN, and integers too large for a float
        raise ReadingError(name, f"{name} is not a usable epoch time")
    return round(value if abs(value) >= MILLISECONDS_FROM else value * 1000)


@functools.lru_cache(maxsize=1024)
def is_sensor_id(text: str) -> bool:
    """Remembered, as the readings of a batch mostly share their sensor id."""
    return SENSOR_ID.fullmatch(text) is not None


def parse_reading(data: object, settings: Settings, client_ip: str, now_ms: int) -> Reading:
    """Validate what a device sent; unknown keys are ignored so newer firmware keeps working."""
    if not isinstance(data, dict):
        raise ReadingError("reading", "a reading must be a JSON object")
    sensor_id = data.get("sensor_id")
    if sensor_id is None or sensor_id == "":
        raise ReadingError("sensor_id", "sensor_id is missing")
    # Checking the length first keeps long strings out of is_sensor_id's memory.
    if (
        not isinstance(sensor_id, str)
        or len(sensor_id) > SENSOR_ID_LENGTH
        or not is_sensor_id(sensor_id)
    ):
        raise ReadingError("sensor_id", "sensor_id must be 1-64 letters, digits or _ - . :")

    values = {}
    ranges = settings.ranges
    for field in settings.fields:
        if field in data:
            values[field] = parse_number(field, data[field], ranges.get(field))
    if not values:
        raise ReadingError(
            "reading", f"a reading needs at least one of: {', '.join(settings.fields)}"
        )

    ts_ms = data.get("timestamp")
    if ts_ms is not None:
        ts_ms = parse_time("timestamp", ts_ms)
        if not EARLIEST_DEVICE_MS <= ts_ms <= now_ms + FUTURE_SLACK_MS:
            ts_ms = None  # the board's clock is not set: the server's clock is used instead
    return Reading(sensor_id, values, ts_ms, client_ip)


class ServerClock:
    """Gives readings without device time a server timestamp no other reading of that sensor has."""

    def __init__(self, last_ms: dict[str, int]) -> None:
        self.last_ms = last_ms

    def stamp(self, readings: Iterable[Reading]) -> None:
        """Stamp in order; within one request the stamps also strictly increase."""
        previous = 0
        now_ms = time.time_ns() // 1_000_000
        for reading in readings:
            if reading.ts_ms is not None:
                continue
            stamp = max(now_ms, previous + 1, self.last_ms.get(reading.sensor_id, 0) + 1)
            reading.ts_ms = previous = self.last_ms[reading.sensor_id] = stamp
            reading.device_clock = False


# --- Storage -------------------------------------------------------------------------------


MAX_SQL_VARIABLES = 999  # per statement in SQLite before 3.32; later versions allow more
SENSOR_OF = attrgetter("sensor_id")


class StoreError(Exception):
    """The store cannot take writes; the client gets 503 and nothing is acknowledged."""


class OutcomeUnknown(StoreError):
    """The writer process ended during a write: it may have committed it before it went."""


@dataclass
class WriteResult:
    stored: list[Reading]
    duplicates: list[Reading]


LOCK_WAIT_SECONDS = 5  # for the write lock, while another connection holds it
LOCK_POLL_SECONDS = 0.0005  # the InfluxDB delivery holds it for a moment after each commit


class SQLiteStore:
    """Readings in one SQLite file (WAL). The writer process writes (see WriterProcess); the
    server reads, through connections of its own."""

    def __init__(self, path: Path, fields: tuple[str, ...], outbox: bool = False) -> None:
        self.path = path
        self.fields = fields
        self.outbox = outbox  # in InfluxDB mode: what InfluxDB has not accepted yet
        self.columns = ", ".join(f'"{name}"' for name in fields)
        width = 5 + len(fields)
        placeholders = f"({', '.join('?' * width)})"
        self.insert_sql = (
            f"INSERT OR IGNORE INTO readings (id, sensor_id, ts_ms, device_clock, client_ip,"
            f" {self.columns}) VALUES {placeholders}"
        )
        self.rows_per_insert = max(1, MAX_SQL_VARIABLES // width)
        self.insert_many_sql = self.insert_sql + f", {placeholders}" * (self.rows_per_insert - 1)
        self.writer: sqlite3.Connection | None = None
        self.reader: sqlite3.Connection | None = None
        self.next_id = 1
        self.sensor_fields: dict[str, set[str]] = {}
        self.last_server_ms: dict[str, int] = {}
        self.write_error: str | None = None
        self.locked_since: float | None = None  # when the write lock was found held, if it is
        self.commits = 0
        self.identity: tuple[int, int] | None = None  # the file opened: (device, inode)
        self.fields_unsure = False  # after a failed write, sensor_fields may say too much

    def connect(self, busy_ms: int = LOCK_WAIT_SECONDS * 1000) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit: an acknowledged reading survives a power cut.
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(f"PRAGMA busy_timeout={busy_ms}")
        return connection

    def connect_reader(self) -> sqlite3.Connection:
        """A connection that only reads, and never makes a file: were the database moved away,
        an empty one made in its place would make SQLite drop the write-ahead log beside it."""
        address = "file:" + quote(str(self.path.resolve())) + "?mode=ro"
        connection = sqlite3.connect(
            address, uri=True, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA query_only=1")
        return connection

    def open(self) -> None:
        """Open for writing, making the tables as needed: in the writer process."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.path.with_name(self.path.name + "-wal")
        if not self.path.exists() and log_file.exists() and log_file.stat().st_size:
            # A new database here would make SQLite drop that log, and the readings in it.
            raise OSError(
                f"{log_file.name} is there without {self.path.name}: the database was moved or"
                f" deleted without it. Put {self.path.name} back, or remove {log_file.name} to"
                " start an empty database"
            )
        self.writer = self.connect()
        self.identity = file_identity(self.path)
        self.writer.executescript("""
            CREATE TABLE IF NOT EXISTS readings (
                id INTEGER PRIMARY KEY, sensor_id TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                device_clock INTEGER NOT NULL, client_ip TEXT NOT NULL);
            CREATE UNIQUE INDEX IF NOT EXISTS readings_by_sensor_time ON readings(sensor_id, ts_ms);
            CREATE TABLE IF NOT EXISTS sensors (
                sensor_id TEXT PRIMARY KEY, first_ms INTEGER, last_ms INTEGER, count INTEGER,
                fields TEXT, last_server_ms INTEGER);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, spooled_ms INTEGER);
            CREATE TABLE IF NOT EXISTS set_aside (id INTEGER PRIMARY KEY, reason TEXT);
        """)
        known = {row[1] for row in self.writer.execute("PRAGMA table_info(readings)")}
        for name in self.fields:
            if name not in known:  # a field added to FIELDS gets its column; old rows keep NULL
                self.writer.execute(f'ALTER TABLE readings ADD COLUMN "{name}" REAL')
        self.load_sensor_fields()
        self.writer.execute("PRAGMA busy_timeout=0")  # waiting for the lock: see begin

    def load_sensor_fields(self) -> None:
        """Which fields each sensor has sent, as stored: kept in memory for the sensors table."""
        self.sensor_fields = {
            sensor_id: set(filter(None, fields.split(",")))
            for sensor_id, fields in self.writer.execute("SELECT sensor_id, fields FROM sensors")
        }
        self.fields_unsure = False

    def open_reader(self) -> None:
        """Open for reading, in the server, once the writer process has made the tables."""
        self.reader = self.connect_reader()
        for sensor_id, last_server_ms in self.reader.execute(
            "SELECT sensor_id, last_server_ms FROM sensors"
        ):
            self.last_server_ms[sensor_id] = last_server_ms or 0

    def close(self) -> None:
        for connection in (self.writer, self.reader):
            if connection is not None:
                connection.close()

    # Writing: in the writer process, one transaction at a time.

    def begin(self) -> None:
        """Take the write lock, waiting for another connection (the InfluxDB delivery, another
        program) to let go of it, up to LOCK_WAIT_SECONDS from when it was first found held:
        writes queued meanwhile do not each wait anew. A second later, a write waits anew."""
        now = time.monotonic()
        if self.locked_since is None or now - self.locked_since > LOCK_WAIT_SECONDS + 1:
            self.locked_since = now
        while not self.guard(self.take_write_lock):
            if time.monotonic() - self.locked_since > LOCK_WAIT_SECONDS:
                self.write_error = "another program holds the database's write lock"
                raise StoreError(self.write_error)
            time.sleep(LOCK_POLL_SECONDS)

    def take_write_lock(self) -> bool:
        if file_identity(self.path) != self.identity:  # what we would write would be lost
            self.fail(MOVED_FILE)
            raise StoreError(MOVED_FILE)
        if self.writer is None:
            self.writer = self.connect(busy_ms=0)
        try:
            self.writer.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            return False
        self.locked_since = None
        # Read under the lock: a stopped server's writer may have committed after we opened.
        last_id = self.writer.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
        self.next_id = max(self.next_id, last_id + 1)
        if self.fields_unsure:
            self.load_sensor_fields()
        return True

    def insert(self, jobs: list[list[Reading]]) -> list[WriteResult]:
        """Insert every job's readings; duplicates are skipped, not stored."""
        first_id = self.next_id
        try:
            return self.guard(self.insert_rows, jobs)
        except StoreError:
            self.next_id = first_id
            raise

    def insert_rows(self, jobs: list[list[Reading]]) -> list[WriteResult]:
        first_id = self.next_id
        readings = [reading for job in jobs for reading in job]
        for reading_id, reading in enumerate(readings, first_id):
            reading.id = reading_id
        self.next_id = first_id + len(readings)
        changes_before = self.writer.total_changes
        self.insert_all(readings)
        if self.writer.total_changes - changes_before == len(readings):
            results = [WriteResult(list(job), []) for job in jobs]  # nothing was a duplicate
            stored = readings
        else:
            inserted = {
                row[0]
                for row in self.writer.execute("SELECT id FROM readings WHERE id >= ?", (first_id,))
            }
            results = [self.sort_out(job, inserted) for job in jobs]
            stored = [reading for result in results for reading in result.stored]
        self.update_sensors(stored)
        if self.outbox:
            spooled_ms = time.time_ns() // 1_000_000
            self.writer.executemany(
                "INSERT INTO outbox VALUES (?, ?)", [(r.id, spooled_ms) for r in stored]
            )
        return results

    def commit(self) -> None:
        """Make the transaction durable: it returns once the disk has it."""
        self.guard(self.writer.execute, "COMMIT")
        self.write_error = None
        self.commits += 1

    def guard(self, step, *args):
        """Run one step of a write; on an SQLite error, drop the transaction and report why."""
        try:
            return step(*args)
        except sqlite3.Error as error:
            self.fail(describe_store_error(error))
            raise StoreError(self.write_error) from error

    def insert_all(self, readings: list[Reading]) -> None:
        """Whole groups of rows in one INSERT each, the rest one by one: SQLite runs one
        statement for many rows in less time than the same statement once per row."""
        step = self.rows_per_insert
        grouped = len(readings) - len(readings) % step
        for start in range(0, grouped, step):
            rows = self.parameters(readings[start : start + step])
            self.writer.execute(self.insert_many_sql, rows)
        self.writer.executemany(self.insert_sql, map(self.row, readings[grouped:]))

    def row(self, reading: Reading) -> list:
        return self.parameters([reading])

    def parameters(self, readings: list[Reading]) -> list:
        """The INSERT parameters of these readings, one row after the other."""
        fields = self.fields
        parameters = []
        for reading in readings:
            values = reading.values
            parameters += (
                reading.id,
                reading.sensor_id,
                reading.ts_ms,
                int(reading.device_clock),
                reading.client_ip,
                *[values.get(name) for name in fields],
            )
        return parameters

    def sort_out(self, job: list[Reading], inserted: set[int]) -> WriteResult:
        """Split a job into stored readings and duplicates of readings already stored."""
        result = WriteResult([], [])
        for reading in job:
            if reading.id in inserted:
                result.stored.append(reading)
            elif not reading.device_clock:
                self.insert_at_next_free_ms(reading)
                result.stored.append(reading)
            else:
                result.duplicates.append(reading)
        if len(job) == 1 and result.duplicates:
            result.duplicates = [self.find(job[0].sensor_id, job[0].ts_ms, self.writer)]
        return result

    def insert_at_next_free_ms(self, reading: Reading) -> None:
        """A server-stamped reading that met a device reading at the same ms moves one ms on."""
        while True:
            reading.ts_ms += 1
            cursor = self.writer.execute(
                self.insert_sql,
                self.row(reading),
            )
            if cursor.rowcount == 1:
                return

    def update_sensors(self, readings: list[Reading]) -> None:
        by_sensor: dict[str, list[Reading]] = {}
        for sensor_id, run in itertools.groupby(readings, SENSOR_OF):  # a batch is one long run
            by_sensor.setdefault(sensor_id, []).extend(run)
        self.writer.executemany(
            "INSERT INTO sensors VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(sensor_id) DO UPDATE SET"
            " first_ms = min(first_ms, excluded.first_ms),"
            " last_ms = max(last_ms, excluded.last_ms),"
            " count = count + excluded.count, fields = excluded.fields,"
            " last_server_ms = max(last_server_ms, excluded.last_server_ms)",
            [self.sensor_row(sensor_id, group) for sensor_id, group in by_sensor.items()],
        )

    def sensor_row(self, sensor_id: str, readings: list[Reading]) -> tuple:
        """The sensors table's row for what these readings add: first, last, count, fields."""
        times = [reading.ts_ms for reading in readings]
        server_times = [reading.ts_ms for reading in readings if not reading.device_clock]
        fields = self.sensor_fields.setdefault(sensor_id, set())
        fields.update(*[reading.values for reading in readings])
        return (
            sensor_id,
            min(times),
            max(times),
            len(times),
            ",".join(sorted(fields)),
            max(server_times, default=0),
        )

    def fail(self, reason: str) -> None:
        """Roll back and drop the connection, so the next write starts on a fresh one."""
        self.write_error = reason
        self.fields_unsure = True
        try:
            self.writer.close()
        except (sqlite3.Error, AttributeError):
            pass
        self.writer = None

    def probe(self) -> None:
        """Write a row as large as a batch of readings, to learn whether the store takes writes
        again: a tiny one can fit where a real write no longer does."""
        self.begin()
        self.guard(
            self.writer.execute,
            "INSERT OR REPLACE INTO meta VALUES ('probe', zeroblob(?))",
            (PROBE_BYTES,),
        )
        self.guard(self.writer.execute, "COMMIT")
        self.write_error = None

    # Reading: called from the reader thread.

    def find(self, sensor_id: str, ts_ms: int, connection: sqlite3.Connection) -> Reading:
        row = connection.execute(
            self.select("WHERE sensor_id = ? AND ts_ms = ?"), (sensor_id, ts_ms)
        ).fetchone()
        return self.reading(row)

    def select(self, where: str) -> str:
        return (
            f"SELECT id, sensor_id, ts_ms, device_clock, client_ip, {self.columns}"
            f" FROM readings {where}"
        )

    def reading(self, row: tuple) -> Reading:
        values = {
            name: value
            for name, value in zip(self.fields, row[5:], strict=True)
            if value is not None
        }
        return Reading(row[1], values, row[2], row[4], id=row[0], device_clock=bool(row[3]))

    def latest(self, sensor_id: str, pending_only: bool = False) -> Reading | None:
        pending = PENDING if pending_only else ""
        row = self.reader.execute(
            self.select(f"WHERE sensor_id = ? {pending} ORDER BY ts_ms DESC LIMIT 1"), (sensor_id,)
        ).fetchone()
        return self.reading(row) if row else None

    def history(
        self,
        sensor_id: str,
        start_ms: int,
        end_ms: int,
        limit: int,
        descending: bool,
        pending_only: bool = False,
    ) -> Iterator[list[Reading]]:
        """The sensor's readings in [start, end], in chunks so an export never sits in memory."""
        order = "DESC" if descending else "ASC"
        pending = PENDING if pending_only else ""
        query = self.select(
            f"WHERE sensor_id = ? AND ts_ms BETWEEN ? AND ? {pending} ORDER BY ts_ms {order}"
            " LIMIT ?"
        )
        span = (start_ms, end_ms, limit, descending)
        for rows in self.in_chunks(query, (sensor_id,), span, time_of=lambda row: row[2]):
            yield [self.reading(row) for row in rows]

    def in_chunks(self, query: str, first: tuple, span: tuple, time_of, width: int = 1):
        """Rows of a query over [start, end], a chunk at a time, each chunk its own query from
        where the last one stopped: a slow or abandoned export then holds no read snapshot,
        which would keep SQLite from reusing its write-ahead log (it would grow without end)."""
        start_ms, end_ms, limit, descending = span
        connection = self.connect_reader()
        try:
            while limit > 0:
                chunk = (*first, start_ms, end_ms, min(limit, HISTORY_CHUNK))
                rows = connection.execute(query, chunk).fetchall()
                if not rows:
                    return
                yield rows
                limit -= len(rows)
                if descending:
                    end_ms = time_of(rows[-1]) - 1
                else:
                    start_ms = time_of(rows[-1]) + width
        finally:
            connection.close()

    def buckets(
        self,
        sensor_id: str,
        start_ms: int,
        end_ms: int,
        every_ms: int,
        limit: int,
        descending: bool,
        pending_only: bool = False,
    ) -> Iterator[list[tuple]]:
        """One row per time bucket: its start, its count, then for each field the count, sum,
        min and max of its values."""
        stats = ", ".join(f'count("{n}"), sum("{n}"), min("{n}"), max("{n}")' for n in self.fields)
        order = "DESC" if descending else "ASC"
        pending = PENDING if pending_only else ""
        query = (
            f"SELECT ts_ms / ? * ? AS bucket, count(*), {stats} FROM readings"
            f" WHERE sensor_id = ? AND ts_ms BETWEEN ? AND ? {pending}"
            f" GROUP BY bucket ORDER BY bucket {order} LIMIT ?"
        )
        span = (start_ms, end_ms, limit, descending)
        first = (every_ms, every_ms, sensor_id)
        yield from self.in_chunks(query, first, span, time_of=lambda row: row[0], width=every_ms)

    def sensors(self) -> list[tuple[str, int, int, int, list[str], Reading | None]]:
        rows = self.reader.execute(
            "SELECT sensor_id, first_ms, last_ms, count, fields FROM sensors ORDER BY sensor_id"
        )
        return [
            (sensor_id, first, last, count, fields.split(","), self.latest(sensor_id))
            for sensor_id, first, last, count, fields in rows.fetchall()
        ]

    def pending_sensors(self) -> list[tuple[str, int, int, int, list[str]]]:
        """Per sensor, what the outbox holds: first and last time, count, fields present."""
        present = ", ".join(f'count("{name}")' for name in self.fields)
        rows = self.reader.execute(
            f"SELECT sensor_id, min(ts_ms), max(ts_ms), count(*), {present} FROM readings"
            f" WHERE 1 {PENDING} GROUP BY sensor_id"
        ).fetchall()
        return [
            (
                row[0],
                row[1],
                row[2],
                row[3],
                [f for f, n in zip(self.fields, row[4:], strict=True) if n],
            )
            for row in rows
        ]

    # The outbox, used by the InfluxDB delivery thread through its own connection.

    def outbox_batch(self, connection: sqlite3.Connection, limit: int) -> list[Reading]:
        rows = connection.execute(
            self.select(f"WHERE 1 {PENDING} ORDER BY id LIMIT ?"), (limit,)
        ).fetchall()
        return [self.reading(row) for row in rows]

    def outbox_done(
        self, connection: sqlite3.Connection, ids: list[int], set_aside: dict[int, str]
    ) -> None:
        """Forget delivered readings; keep refused ones aside with the reason."""
        with transaction(connection):
            connection.executemany("INSERT OR REPLACE INTO set_aside VALUES (?, ?)",
                                   set_aside.items())  # fmt: skip
            connection.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def outbox_state(self, connection: sqlite3.Connection) -> tuple[int, int | None, int]:
        """Backlog size, when its oldest reading was spooled, and how many were set aside."""
        backlog, oldest = connection.execute(
            "SELECT count(*), min(spooled_ms) FROM outbox"
        ).fetchone()
        set_aside = connection.execute("SELECT count(*) FROM set_aside").fetchone()[0]
        return backlog, oldest, set_aside

    def forget_delivered(self, connection: sqlite3.Connection, before_ms: int) -> None:
        """Drop delivered readings older than the window kept for spotting resent readings."""
        with transaction(connection):
            connection.execute(
                "DELETE FROM readings WHERE ts_ms < ? AND id NOT IN (SELECT id FROM outbox)"
                " AND id NOT IN (SELECT id FROM set_aside)",
                (before_ms,),
            )


PENDING = "AND id IN (SELECT id FROM outbox)"
HISTORY_CHUNK = 1000


@contextmanager
def transaction(connection: sqlite3.Connection):
    """One transaction, one commit to disk, on a connection in autocommit mode (where `with
    connection` would leave every statement a transaction of its own)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def describe_store_error(error: sqlite3.Error) -> str:
    text = str(error).lower()
    if "full" in text:
        return "the disk holding the database is full"
    if "readonly" in text or "read-only" in text:
        return "the database file is read-only"
    if "disk i/o" in text:
        return "disk I/O error writing the database (the disk may be full or failing)"
    return f"the database cannot be written ({getattr(error, 'sqlite_errorname', 'error')})"


PROBE_BYTES = 256 * 1024
MOVED_FILE = (
    "the database file was moved, replaced or deleted while the server ran: stop the server and"
    " put the file back, with the -wal file beside it, before starting it again"
)


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


DELIVERY_BATCH = 5000
BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)


def backoff_seconds(failures: int) -> float:
    """How long to wait before the next try, after this many failures in a row (at least 1)."""
    return BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS)) - 1]


RESEND_WINDOW_MS = 24 * 3600 * 1000  # delivered readings kept locally to spot a resend
INFLUX_TIME_LIMIT_MS = (2**63 - 1) // 1_000_000  # InfluxDB times are int64 nanoseconds


class InfluxStore:
    """Readings in InfluxDB 3, through influxdb3-python. Each reading is first committed to the
    local SQLite store, whose outbox holds what InfluxDB has not accepted yet; a delivery thread
    sends the outbox oldest first, many readings per write. Reads ask InfluxDB with bound
    parameters and add what is still in the outbox, so a 201 can always be read back."""

    def __init__(self, settings: Settings, local: SQLiteStore) -> None:
        from influxdb_client_3 import (  # imported only in this mode: it is large
            InfluxDBClient3,
            WriteOptions,
            WriteType,
            write_client_options,
        )

        self.local = local
        self.fields = settings.fields
        self.table = settings.influx_measurement
        options = WriteOptions(
            write_type=WriteType.synchronous,  # one request per write, no hidden retries
            use_v2_api=False,
            timeout=settings.influx_write_timeout * 1000,
        )
        self.client = InfluxDBClient3(
            host=settings.influx_host,
            token=settings.influx_token,
            database=settings.influx_database,
            write_client_options=write_client_options(write_options=options),
            query_timeout=settings.influx_write_timeout * 1000,
        )
        self.influx_state = "starting"
        self.influx_detail: str | None = None
        self.failures = 0
        self.connection: sqlite3.Connection | None = None  # the delivery thread's
        self.state_connection: sqlite3.Connection | None = None

    def close(self) -> None:
        self.client.close()
        for connection in (self.connection, self.state_connection):
            if connection is not None:
                connection.close()

    # Delivery: called only from the delivery thread.

    def point(self, reading: Reading):
        from influxdb_client_3 import Point, WritePrecision

        point = Point(self.table).tag("sensor_id", reading.sensor_id)
        for name, value in reading.values.items():
            point.field(name, float(value))  # a Python int would become an integer column
        point.field("client_ip", reading.client_ip)
        point.field("clock", "device" if reading.device_clock else "server")
        point.field("id", int(reading.id))
        return point.time(reading.ts_ms, WritePrecision.MS)  # explicit: the default is ns

    def deliver(self) -> float | None:
        """Send the oldest outbox readings in one write. Returns the seconds to wait before the
        next try (0: go on at once), or None when the outbox is empty."""
        import urllib3
        from influxdb_client_3.exceptions import InfluxDBError, InfluxDBPartialWriteError

        if self.connection is None:
            self.connection = self.local.connect()
        batch = self.local.outbox_batch(self.connection, DELIVERY_BATCH)
        if not batch:
            now_ms = time.time_ns() // 1_000_000
            self.local.forget_delivered(self.connection, now_ms - RESEND_WINDOW_MS)
            return None
        set_aside: dict[int, str] = {}
        try:
            self.client.write(record=[self.point(reading) for reading in batch])
        except InfluxDBPartialWriteError as error:
            # InfluxDB stored the other lines: set aside only those it refused.
            for line in error.line_errors:
                reading = batch[line.line_number - 1]
                set_aside[reading.id] = line.error_message[:300]
                log.error(
                    "InfluxDB refused the reading of %s at %s, set aside: %s",
                    reading.sensor_id,
                    format_timestamp(reading.ts_ms),
                    line.error_message[:200],
                )
        except InfluxDBError as error:
            status = getattr(error, "status", None)
            return self.down(f"InfluxDB answered {status}", getattr(error, "retry_after", None))
        except urllib3.exceptions.HTTPError as error:
            reason = "timed out" if "timeout" in type(error).__name__.lower() else "unreachable"
            return self.down(f"InfluxDB {reason}", None)
        if self.influx_state == "down":
            log.info("InfluxDB accepts writes again")
        self.influx_state, self.influx_detail, self.failures = "up", None, 0
        self.local.outbox_done(self.connection, [reading.id for reading in batch], set_aside)
        return 0

    def down(self, detail: str, retry_after: str | None) -> float:
        DELIVERY_FAILURES.inc()
        if self.influx_state != "down":
            log.warning("%s: readings wait in the local spool", detail)
        self.influx_state, self.influx_detail = "down", detail
        self.failures += 1
        backoff = backoff_seconds(self.failures)
        if retry_after and retry_after.isdigit():
            backoff = max(backoff, min(int(retry_after), BACKOFF_SECONDS[-1]))
        return backoff

    def outbox_state(self) -> tuple[int, int | None, int]:
        """For health and metrics, on a connection of its own: the delivery's may be waiting
        for the write lock."""
        if self.state_connection is None:
            self.state_connection = self.local.connect_reader()
        return self.local.outbox_state(self.state_connection)

    # Reads: called from the reader thread.

    def query(self, sql: str, **parameters) -> list[dict]:
        """Rows of a parameterised query; a table InfluxDB has never seen has no rows."""
        from influxdb_client_3.exceptions import InfluxDB3ClientQueryError

        try:
            table = self.client.query(
                sql.format(table=f'"{self.table}"'), query_parameters=parameters
            )
        except InfluxDB3ClientQueryError as error:
            if "not found" in str(error):
                return []
            raise
        if "time" in table.column_names:
            import pyarrow

            nanoseconds = table.column("time").cast(pyarrow.int64())
            table = table.set_column(table.column_names.index("time"), "time", nanoseconds)
        return table.to_pylist()

    def reading(self, row: dict) -> Reading:
        values = {name: row[name] for name in self.fields if row.get(name) is not None}
        return Reading(
            row["sensor_id"],
            values,
            row["time"] // 1_000_000,
            row.get("client_ip") or "",
            id=row.get("id"),
            device_clock=row.get("clock") == "device",
        )

    def latest(self, sensor_id: str) -> Reading | None:
        return self.or_local(self.latest_merged, self.local.latest, sensor_id)

    def history(self, *args) -> Iterator[list[Reading]]:
        # A generator, so the query runs on the reader thread when the first chunk is asked for.
        yield from self.or_local(chunked_merge(self.history_merged), self.local.history, *args)

    def buckets(self, *args) -> Iterator[list[tuple]]:
        yield from self.or_local(chunked_merge(self.buckets_merged), self.local.buckets, *args)

    def sensors(self) -> list[tuple[str, int, int, int, list[str], Reading | None]]:
        return self.or_local(self.sensors_merged, self.local.sensors)

    def or_local(self, read, fallback, *args):
        """Ask InfluxDB; while it cannot answer, answer from the local store, which keeps the
        last day of readings and everything not yet delivered."""
        from influxdb_client_3.exceptions import InfluxDB3ClientQueryError

        try:
            return read(*args)
        except InfluxDB3ClientQueryError as error:
            log.warning("InfluxDB cannot be queried, answering from the local store: %.120s", error)
            return fallback(*args)

    def latest_merged(self, sensor_id: str) -> Reading | None:
        rows = self.query(
            "SELECT * FROM {table} WHERE sensor_id = $sensor ORDER BY time DESC LIMIT 1",
            sensor=sensor_id,
        )
        candidates = [self.reading(row) for row in rows]
        pending = self.local.latest(sensor_id, pending_only=True)
        candidates += [pending] if pending else []
        return max(candidates, key=lambda reading: reading.ts_ms, default=None)

    def history_merged(
        self, sensor_id: str, start_ms: int, end_ms: int, limit: int, descending: bool
    ) -> list[Reading]:
        order = "DESC" if descending else "ASC"
        rows = self.query(
            "SELECT * FROM {table} WHERE sensor_id = $sensor"
            " AND time >= to_timestamp_millis($start) AND time <= to_timestamp_millis($end)"
            f" ORDER BY time {order} LIMIT $limit",
            sensor=sensor_id,
            limit=limit,
            **influx_range(start_ms, end_ms),
        )
        stored = [self.reading(row) for row in rows]
        chunks = self.local.history(sensor_id, start_ms, end_ms, limit, descending, True)
        pending = [reading for chunk in chunks for reading in chunk]
        merged = {reading.ts_ms: reading for reading in stored + pending}
        return sorted(merged.values(), key=lambda r: r.ts_ms, reverse=descending)[:limit]

    def buckets_merged(
        self,
        sensor_id: str,
        start_ms: int,
        end_ms: int,
        every_ms: int,
        limit: int,
        descending: bool,
    ) -> list[tuple]:
        columns = self.columns()
        stats = ", ".join(
            f'count("{n}") AS "{n}_n", sum("{n}") AS "{n}_sum", min("{n}") AS "{n}_min",'
            f' max("{n}") AS "{n}_max"'
            for n in self.fields
            if n in columns
        )
        rows = (
            self.query(
                "SELECT CAST(time AS BIGINT) / 1000000 / $every * $every AS bucket,"
                f" count(*) AS n{', ' + stats if stats else ''} FROM {{table}}"
                " WHERE sensor_id = $sensor"
                " AND time >= to_timestamp_millis($start) AND time <= to_timestamp_millis($end)"
                " GROUP BY CAST(time AS BIGINT) / 1000000 / $every * $every",
                sensor=sensor_id,
                every=every_ms,
                **influx_range(start_ms, end_ms),
            )
            if columns
            else []
        )
        merged: dict[int, list] = {}
        for row in rows:
            stats_row = [row["n"]]
            for name in self.fields:
                stats_row += [row.get(f"{name}_{s}") for s in ("n", "sum", "min", "max")]
            merged[row["bucket"]] = stats_row
        for chunk in self.local.buckets(
            sensor_id, start_ms, end_ms, every_ms, limit, descending, pending_only=True
        ):
            for row in chunk:
                merged[row[0]] = combine_buckets(merged.get(row[0]), list(row[1:]))
        ordered = sorted(merged.items(), reverse=descending)[:limit]
        return [(bucket, *stats_row) for bucket, stats_row in ordered]

    def columns(self) -> set[str]:
        rows = self.query("SELECT * FROM {table} LIMIT 1")
        return set(rows[0]) if rows else set()

    def sensors_merged(self) -> list[tuple[str, int, int, int, list[str], Reading | None]]:
        columns = self.columns()
        present = "".join(f', count("{n}") AS "{n}"' for n in self.fields if n in columns)
        rows = (
            self.query(
                "SELECT sensor_id, CAST(min(time) AS BIGINT) AS first,"
                f" CAST(max(time) AS BIGINT) AS last, count(*) AS n{present}"
                " FROM {table} GROUP BY sensor_id"
            )
            if columns
            else []
        )
        summary = {
            row["sensor_id"]: [
                row["first"] // 1_000_000,
                row["last"] // 1_000_000,
                row["n"],
                {name for name in self.fields if row.get(name)},
            ]
            for row in rows
        }
        for sensor_id, first, last, count, fields in self.local.pending_sensors():
            entry = summary.setdefault(sensor_id, [first, last, 0, set()])
            entry[0], entry[1] = min(entry[0], first), max(entry[1], last)
            entry[2] += count
            entry[3].update(fields)
        return [
            (sensor_id, first, last, count, sorted(fields), self.latest_merged(sensor_id))
            for sensor_id, (first, last, count, fields) in sorted(summary.items())
        ]


def influx_range(start_ms: int, end_ms: int) -> dict[str, int]:
    """Query parameters for a time range, kept within what InfluxDB can represent."""
    return {"start": max(start_ms, -INFLUX_TIME_LIMIT_MS), "end": min(end_ms, INFLUX_TIME_LIMIT_MS)}


def chunked_merge(read):
    """Turn a read that returns one list into one that yields chunks, like the SQLite store."""

    def chunks(*args) -> Iterator[list]:
        rows = read(*args)  # here, not lazily, so a failed query falls back to the local store
        return iter(
            [rows[start : start + HISTORY_CHUNK] for start in range(0, len(rows), HISTORY_CHUNK)]
        )

    return chunks


def combine_buckets(stored: list | None, pending: list) -> list:
    """Add a bucket of outbox readings to the same bucket from InfluxDB."""
    if stored is None:
        return pending
    combined = [stored[0] + pending[0]]
    for index in range(1, len(stored), 4):
        (n1, s1, lo1, hi1), (n2, s2, lo2, hi2) = (
            stored[index : index + 4],
            pending[index : index + 4],
        )
        combined += [
            (n1 or 0) + (n2 or 0),
            (s1 or 0) + (s2 or 0),
            min(v for v in (lo1, lo2) if v is not None) if n1 or n2 else None,
            max(v for v in (hi1, hi2) if v is not None) if n1 or n2 else None,
        ]
    return combined


# --- Storage: the writer process -----------------------------------------------------------


class WriterProcess(asyncio.Protocol):
    """The server's side of the process that writes the SQLite store. Forked at start-up, it
    commits on a core of its own and answers over a socket pair. A writer thread would share
    the interpreter lock with the busy event loop, and under load each commit waited
    milliseconds to win it back after the disk was done.

    The server sends what each loop turn gathered in one message; the writer commits everything
    that has arrived since its last commit in one transaction (a group commit) and answers each
    request. Readings are answered, then pushed to subscribers, in the order they were stored."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.pid = 0
        self.channel: socket.socket | None = None
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subscribers: Subscribers | None = None
        self.zone: ZoneInfo | None = None
        self.numbers = itertools.count(1)
        self.outgoing: list[tuple] = []  # requests gathered in this loop turn
        self.waiting: dict[int, tuple[list[Reading] | None, asyncio.Future]] = {}
        self.heard = 0.0  # loop time of the writer's last answer, or of a request to an idle one
        self.buffer = bytearray()
        self.write_error: str | None = None  # why the store takes no writes, if it does not
        self.commits = 0
        self.committed = asyncio.Event()  # wakes the InfluxDB delivery after each commit
        self.stopping = False
        self.lost = False  # the writer ended before the server stopped it
        self.on_lost: Callable[[], None] = lambda: None

    def start(self) -> str | None:
        """Fork the writer and wait until it has opened the store; what went wrong, if anything.
        Call it before the server starts any thread: a fork copies only the calling one."""
        ours, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            try:
                run_writer(self.store, theirs)
            except BaseException:
                traceback.print_exc()  # to the server's own standard error
                os._exit(1)
            os._exit(0)
        theirs.close()
        self.channel = ours
        answer = receive_message(ours, bytearray())
        return "the writer process ended at start" if answer is END else answer

    async def attach(self, subscribers: Subscribers, zone: ZoneInfo) -> None:
        """Join the event loop: from here on writes are sent and answered through it."""
        self.loop = asyncio.get_running_loop()
        self.subscribers, self.zone = subscribers, zone
        await self.loop.create_unix_connection(lambda: self, sock=self.channel)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    async def write(self, readings: list[Reading]) -> WriteResult:
        """Store readings; answered once they are durably committed."""
        future = self.request("write", [reading.as_row() for reading in readings], readings)
        return await future

    async def probe(self) -> None:
        """Learn whether the store takes writes again (it raises StoreError if not)."""
        await self.request("probe", None, None)

    async def ping(self) -> None:
        """Answered once the writer has finished what it was sent before."""
        await self.request("ping", None, None)

    def request(self, kind: str, payload, readings: list[Reading] | None) -> asyncio.Future:
        if self.transport is None or self.transport.is_closing():
            raise StoreError(self.write_error or "the store's writer process has stopped")
        number = next(self.numbers)
        future = self.loop.create_future()
        if not self.waiting:
            self.heard = self.loop.time()
        self.waiting[number] = (readings, future)
        self.outgoing.append((kind, number, payload))
        # An idle writer starts at once. A busy one will take everything sent meanwhile in its
        # next transaction: send what this loop turn gathers at the turn's end, or a few at a
        # time, so that the writer commits some while the loop works on the rest.
        if len(self.waiting) == len(self.outgoing) or len(self.outgoing) >= SEND_AFTER:
            self.send_outgoing()
        elif len(self.outgoing) == 1:
            self.loop.call_soon(self.send_outgoing)
        return future

    def send_outgoing(self) -> None:
        if self.outgoing and not self.transport.is_closing():
            self.transport.write(message_bytes(self.outgoing))
        self.outgoing = []

    def stalled_for(self) -> float:
        """Seconds the writer has kept requests waiting without an answer (0 when it has none)."""
        return self.loop.time() - self.heard if self.waiting else 0.0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.heard = self.loop.time()
        for answers, write_error, commits, seconds in take_messages(self.buffer):
            if (write_error is None) != (self.write_error is None):  # when it stops or starts again
                if write_error is None:
                    log.info("the store takes writes again")
                else:
                    log.warning("the store takes no writes: %s", write_error)
            self.write_error, self.commits = write_error, commits
            if seconds is not None:
                COMMIT_SECONDS.observe(seconds)
                self.committed.set()
            self.answer(answers)

    def answer(self, answers: list[tuple[int, object]]) -> None:
        stored = []
        for number, outcome in answers:
            readings, future = self.waiting.pop(number)
            if isinstance(outcome, str):  # what went wrong
                result = StoreError(outcome)
            elif readings is None:  # a probe that succeeded
                result = None
            else:  # stored, and told to subscribers, even if the request has gone meanwhile
                result = placed(readings, *outcome)
                STORED.inc(len(result.stored))
                stored += result.stored
            if future.done():
                continue
            if isinstance(result, StoreError):
                future.set_exception(result)
            else:
                future.set_result(result)
        for reading in stored if self.subscribers.live else ():
            self.subscribers.publish(reading, self.zone)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping:
            log.error("the store's writer process ended unexpectedly: stopping the server")
            self.write_error = "the store's writer process has stopped"
            self.lost = True
            self.on_lost()
        for _, future in self.waiting.values():
            if not future.done():
                future.set_exception(OutcomeUnknown(WRITER_LOST))
        self.waiting.clear()

    async def stop(self) -> None:
        """Let the last requests be committed, then close the channel, which ends the writer
        (it commits what it has been sent, answered or not). A stuck writer is killed."""
        for _ in range(ANSWER_WAIT_SECONDS * 100):
            if not self.waiting or self.transport.is_closing():
                break
            await asyncio.sleep(0.01)
        self.stopping = True
        self.transport.close()
        for _ in range(WRITER_EXIT_SECONDS * 100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                if self.lost:
                    log.error("the store's writer process %s", exit_description(status))
                return
            await asyncio.sleep(0.01)
        log.warning("the store's writer process did not end in %d s: killed", WRITER_EXIT_SECONDS)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


ANSWER_WAIT_SECONDS = 3  # at stop, for the last answers (requests had uvicorn's 10 s already)
WRITER_EXIT_SECONDS = 5  # then for the writer to end
WRITER_LOST = (
    "the store's writer process stopped during this write, perhaps after storing it: resend it"
    " with its timestamp, so that a reading already stored is not stored twice"
)
SEND_AFTER = 8  # requests gathered before they are sent to a busy writer


def exit_description(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    return f"was killed by signal {signal.Signals(-code).name}"


def placed(readings: list[Reading], places: list, found: list[Reading]) -> WriteResult:
    """A write's result from the writer's answer: each reading's id and time as stored (it may
    move a server-stamped reading by a millisecond), or None for a duplicate; and for a single
    reading stored before, the reading it repeats."""
    result = WriteResult([], [])
    for reading, place in zip(readings, places, strict=True):
        if place is None:
            result.duplicates.append(reading)
        else:
            reading.id, reading.ts_ms = place
            result.stored.append(reading)
    if found:
        result.duplicates = found
    return result


def run_writer(store: SQLiteStore, channel: socket.socket) -> None:
    """The writer process: open the store, say so, then commit what arrives until the server
    closes its end. It keeps no descriptor of the server's but its channel and the standard
    streams, and ignores Ctrl-C and SIGTERM: the server stops it once the last reading is in."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.closerange(3, channel.fileno())
    os.closerange(channel.fileno() + 1, CLOSE_FROM_LIMIT)
    try:
        store.open()
    except (OSError, sqlite3.Error) as error:
        channel.sendall(message_bytes(str(error)))
        return
    channel.sendall(message_bytes(None))
    buffer, answered = bytearray(), 0.0
    while (requests := receive_requests(channel, buffer, answered)) is not END:
        writes = [(number, rows) for kind, number, rows in requests if kind == "write"]
        answers, seconds = commit_writes(store, writes) if writes else ([], None)
        answers += [(number, probe_store(store)) for kind, number, _ in requests if kind == "probe"]
        answers += [(number, None) for kind, number, _ in requests if kind == "ping"]
        try:
            channel.sendall(message_bytes((answers, store.write_error, store.commits, seconds)))
        except OSError:  # the server has gone (killed): what it sent is committed; end quietly
            break
        answered = time.monotonic()
    store.close()


CLOSE_FROM_LIMIT = 65536
END = object()  # the other side closed the channel


def commit_writes(store: SQLiteStore, writes: list[tuple[int, list[tuple]]]) -> tuple[list, float]:
    """All these writes in one transaction, and each one's answer (see placed)."""
    started = time.perf_counter()
    jobs = [[Reading.from_row(row) for row in rows] for _, rows in writes]
    try:
        store.begin()
        results = store.insert(jobs)
        store.commit()
    except StoreError as error:
        return [(number, str(error)) for number, _ in writes], None
    answers = []
    for (number, _), job, result in zip(writes, jobs, results, strict=True):
        stored = {id(reading) for reading in result.stored}
        places = [(r.id, r.ts_ms) if id(r) in stored else None for r in job]
        found = result.duplicates if len(job) == 1 and result.duplicates else []
        answers.append((number, (places, found)))
    return answers, time.perf_counter() - started


def probe_store(store: SQLiteStore) -> str | None:
    try:
        store.probe()
    except StoreError as error:
        return str(error)
    return None


def receive_requests(channel: socket.socket, buffer: bytearray, answered: float):
    """Wait for the server's next message, then take every other one it has sent meanwhile:
    together they make one transaction. When requests come back to back (this one soon after
    the last answer), wait a moment for more: fewer and larger commits cost less CPU, and
    wear an SD card less. END once the server has closed its end."""
    first = receive_message(channel, buffer)
    if first is END:
        return END
    requests = list(first)
    if time.monotonic() - answered < BUSY_SECONDS and len(requests) < GATHER_ENOUGH:
        time.sleep(GATHER_SECONDS)  # one wake-up, not one per message that arrives meanwhile
    while True:
        requests += [request for message in take_messages(buffer) for request in message]
        try:
            data = channel.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return requests
        if not data:  # the server closed its end: commit what came, see END next time
            return requests
        buffer += data


BUSY_SECONDS = 0.001
GATHER_SECONDS = 0.0003
GATHER_ENOUGH = 16  # requests: with as many, commit at once


def receive_message(channel: socket.socket, buffer: bytearray):
    """The next whole message, waiting for it; END if the other side closed the channel."""
    while not (messages := take_messages(buffer, limit=1)):
        data = channel.recv(RECEIVE_BYTES)
        if not data:
            return END
        buffer += data
    return messages[0]


RECEIVE_BYTES = 1 << 20
MESSAGE_HEAD = struct.Struct("!I")  # a message is its length, then its pickle


def message_bytes(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return MESSAGE_HEAD.pack(len(body)) + body


def take_messages(buffer: bytearray, limit: int | None = None) -> list:
    """The whole messages at the start of buffer (at most limit), taken out of it. Only the
    server and its own writer process speak over the channel, so unpickling is safe."""
    messages, start = [], 0
    while len(buffer) - start >= MESSAGE_HEAD.size and (limit is None or len(messages) < limit):
        (size,) = MESSAGE_HEAD.unpack_from(buffer, start)
        end = start + MESSAGE_HEAD.size + size
        if len(buffer) < end:
            break
        messages.append(pickle.loads(buffer[start + MESSAGE_HEAD.size : end]))
        start = end
    del buffer[:start]
    return messages


async def deliver_forever(store: InfluxStore, committed: asyncio.Event) -> None:
    """Keep sending the outbox to InfluxDB: at once after a commit, after a backoff on failure."""
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensorflow-deliver")
    failures = 0
    try:
        while True:
            committed.clear()
            try:
                wait = await loop.run_in_executor(thread, store.deliver)
                SPOOL_BACKLOG.set((await loop.run_in_executor(thread, store.outbox_state))[0])
                failures = 0
            except sqlite3.Error as error:  # the spool is busy or cannot be written: try again
                if not failures:
                    log.warning("the InfluxDB delivery cannot update the spool: %s", error)
                failures += 1
                wait = backoff_seconds(failures)
            if wait == 0:
                continue
            try:
                if wait is None:  # nothing to send: sleep until the next commit
                    await asyncio.wait_for(committed.wait(), timeout=IDLE_CHECK_SECONDS)
                else:
                    await asyncio.sleep(wait)
            except TimeoutError:
                pass
    finally:
        thread.shutdown(wait=False)


IDLE_CHECK_SECONDS = 60


# --- Live updates ---------------------------------------------------------------------------


class Inbox:
    """Messages waiting for one reader: a list and a future made only while the reader waits,
    in place of an asyncio.Queue, which costs four deques (3 KB). A subscriber holds one for
    what it is sent, and its WebSocket connection one for what it sends."""

    __slots__ = ("messages", "arrival")

    def __init__(self) -> None:
        self.messages: list = []
        self.arrival: asyncio.Future | None = None

    def put_nowait(self, message) -> None:
        self.messages.append(message)
        if self.arrival is not None and not self.arrival.done():
            self.arrival.set_result(None)

    def empty(self) -> bool:
        return not self.messages

    async def wait(self) -> None:
        while not self.messages:
            self.arrival = asyncio.get_running_loop().create_future()
            await self.arrival

    async def get(self):
        await self.wait()
        return self.messages.pop(0)

    async def take_all(self) -> list:
        """Every waiting message, waiting for one if there is none."""
        await self.wait()
        messages, self.messages = self.messages, []
        return messages


class Subscriber:
    """One live WebSocket client with the messages waiting to be sent to it."""

    __slots__ = ("inbox", "sensor_id", "key", "overflowed", "handler")

    def __init__(self, sensor_id: str | None, key: str) -> None:
        self.inbox = Inbox()
        self.sensor_id = sensor_id
        self.key = key
        self.overflowed = False
        self.handler: asyncio.Task | None = None  # the task serving this subscriber


class Subscribers:
    """Every live subscriber; a slow one is dropped instead of slowing ingestion."""

    def __init__(self, per_key: int, queue_size: int) -> None:
        self.per_key = per_key
        self.queue_size = queue_size
        self.live: set[Subscriber] = set()
        self.count_by_key: Tally[str] = Tally()

    def join(self, key: str, sensor_id: str | None) -> Subscriber | None:
        if self.count_by_key[key] >= self.per_key:
            return None
        subscriber = Subscriber(sensor_id, key)
        self.live.add(subscriber)
        self.count_by_key[key] += 1
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        if subscriber in self.live:
            self.live.discard(subscriber)
            self.count_by_key[subscriber.key] -= 1

    def publish(self, reading: Reading, zone: ZoneInfo) -> None:
        if not self.live:
            return
        message = json.dumps(reading.as_dict(zone), separators=(",", ":"))
        for subscriber in list(self.live):
            if subscriber.sensor_id not in (None, reading.sensor_id):
                continue
            if len(subscriber.inbox.messages) < self.queue_size:
                subscriber.inbox.put_nowait(message)
            else:
                DROPPED.inc()
                self.leave(subscriber)
                subscriber.overflowed = True
                if subscriber.handler is not None:
                    subscriber.handler.cancel()
                log.warning("dropped a subscriber that fell %d messages behind", self.queue_size)


# --- Routes ---------------------------------------------------------------------------------

JSON_TYPES = {"", "application/json", "text/plain"}
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_HISTORY_LIMIT = 100_000
YEAR_10000_MS = 253_402_300_800_000
DEFAULT_HISTORY_MS = 24 * 3600 * 1000
EVERY = re.compile(r"([1-9]\d{0,5})(s|m|h|d)")
UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def keys_match(given: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (so rotation needs no downtime)."""
    if not given:
        return False
    given_bytes = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode())
    return matched


class RateLimiter:
    """Token buckets, one per API key and one per client address. A limited client is answered
    429 at once, so it never holds up anybody else."""

    MAX_BUCKETS = 100_000

    def __init__(self, burst: int, per_second: float) -> None:
        self.burst = burst
        self.per_second = per_second
        self.buckets: dict[str, tuple[float, float]] = {}

    def wait_needed(self, name: str) -> float:
        """Take one token; 0 when allowed, else the seconds until a token is back."""
        now = time.monotonic()
        tokens, then = self.buckets.get(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        if tokens < 1:
            self.buckets[name] = (tokens, now)
            return (1 - tokens) / self.per_second
        if len(self.buckets) >= self.MAX_BUCKETS:
            self.buckets.clear()  # a flood of addresses: start afresh rather than grow forever
        self.buckets[name] = (tokens - 1, now)
        return 0.0


def check_rate(state, name: str) -> None:
    if state.limiter is None:
        return
    wait = state.limiter.wait_needed(name)
    if wait:
        seconds = math.ceil(wait)
        raise ApiError(
            429, "too many requests", f"retry in {seconds} s", {"Retry-After": str(seconds)}
        )


def require_key(request: Request) -> None:
    check_key(request.app.state, client_ip(request), request.headers.get("x-api-key"))


def check_key(state, address: str, key: str | None) -> None:
    """Rate-limit the address, check the key, then rate-limit the key."""
    check_rate(state, "address " + address)
    if not keys_match(key, state.settings.api_keys):
        raise ApiError(401, "missing or wrong API key", "send it in the X-API-Key header")
    check_rate(state, "key " + key)


def client_address(scope, trusted: tuple[IPNetwork, ...]) -> str:
    """The socket's peer; behind a trusted proxy, the rightmost X-Forwarded-For hop that is not
    itself a trusted proxy. A header from any other peer is ignored."""
    peer = scope["client"][0] if scope.get("client") else ""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            hops += [hop.strip() for hop in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop if is_address(hop) else peer
    return hops[0] if hops and is_address(hops[0]) else peer


def is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def is_trusted(text: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def client_ip(request: Request) -> str:
    return request.scope["state"]["client_ip"]


class Post:
    """What the ingest routes need of a request, read straight from the ASGI scope: every
    reading takes this path, so it skips Starlette's routing, Request and Response."""

    __slots__ = ("state", "receive", "client_ip", "headers", "sensor", "body_read")

    def __init__(self, state, scope, receive) -> None:
        self.state = state
        self.receive = receive
        self.client_ip: str = scope["state"]["client_ip"]
        self.headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            self.headers.setdefault(name, value.decode("latin-1"))  # the first one counts
        self.sensor: str | None = None  # for the log line
        self.body_read = False

    async def body(self) -> bytes:
        """The request body, refused with 413 as soon as it is known to be over the limit. (A
        body that does not arrive within REQUEST_TIMEOUT is answered below, see the protocol.)"""
        limit = self.state.settings.max_body_bytes
        declared = self.headers.get(b"content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body too large", f"at most {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":  # if too slow, the protocol answered 408
                raise ApiError(408, "body too slow", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body too large", f"at most {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                self.body_read = True
                return b"".join(chunks)

    async def payload(self) -> object:
        kind = self.headers.get(b"content-type", "").split(";")[0].strip().lower()
        if kind not in JSON_TYPES and kind != FORM_TYPE:
            raise ApiError(
                415, "unsupported content type", f"send application/json, text/plain or {FORM_TYPE}"
            )
        body = await self.body()
        # Many HTTP clients (curl -d, some board libraries) label a JSON body as a form.
        if kind != FORM_TYPE or body.lstrip()[:1] in (b"{", b"["):
            return decode_json(body)
        try:
            return dict(parse_qsl(body.decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            raise ApiError(400, "malformed form body", "the form is not UTF-8") from None

    async def commit(self, readings: list[Reading]) -> WriteResult:
        self.state.clock.stamp(readings)
        try:
            return await self.state.writer.write(readings)
        except OutcomeUnknown as error:
            detail = str(error)
            if len(readings) == 1 and not readings[0].device_clock:  # the time we gave it
                detail += f"; this reading's timestamp was {format_timestamp(readings[0].ts_ms)}"
            raise ApiError(503, "storage failed during the write: resend", detail) from None
        except StoreError as error:
            raise ApiError(503, "storage unavailable, reading not stored", str(error)) from None


def decode_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, "malformed JSON", str(error)[:120]) from None
    except ValueError:  # Python's guard against integers of thousands of digits
        raise ApiError(400, "malformed JSON", "a number has too many digits") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON", "nested too deeply") from None


async def post_reading(post: Post) -> tuple[int, dict]:
    """Store one reading. 201 with the stored reading; 200 when it was already stored."""
    settings = post.state.settings
    data = await post.payload()
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    post.sensor = str(data.get("sensor_id", ""))[:64]
    try:
        reading = parse_reading(data, settings, post.client_ip, time.time_ns() // 1_000_000)
    except ReadingError as error:
        raise ApiError(422, error.message, {"field": error.field}) from None

    result = await post.commit([reading])

    post.sensor = reading.sensor_id
    if result.duplicates:
        return 200, result.duplicates[0].as_dict(settings.timezone)
    return 201, reading.as_dict(settings.timezone)


async def post_batch(post: Post) -> tuple[int, dict]:
    """Store a batch: all readings are valid and stored in one transaction, or none is."""
    settings = post.state.settings
    data = await post.payload()
    if isinstance(data, dict) and isinstance(data.get("readings"), list):
        data = data["readings"]
    if not isinstance(data, list):
        raise ApiError(400, 'the body must be a JSON array of readings or {"readings": [...]}')
    if len(data) > settings.max_batch:
        raise ApiError(413, "too many readings in one batch", f"at most {settings.max_batch}")
    if not data:
        raise ApiError(422, "the batch holds no readings")

    now_ms = time.time_ns() // 1_000_000
    readings, problems = [], []
    for index, item in enumerate(data):
        try:
            readings.append(parse_reading(item, settings, post.client_ip, now_ms))
        except ReadingError as error:
            problems.append({"index": index, "field": error.field, "message": error.message})
    if problems:
        counted = f"{len(problems)} invalid reading{'s' if len(problems) > 1 else ''}"
        raise ApiError(422, f"{counted}, none stored", first_problems(problems))

    result = await post.commit(readings)

    device = sum(reading.device_clock for reading in readings)
    body = {
        "stored": len(result.stored),
        "duplicates": len(result.duplicates),
        "clock": {"device": device, "server": len(readings) - device},
    }
    return 201 if result.stored or not result.duplicates else 200, body


def first_problems(problems: list[dict]) -> list[dict]:
    """As many of a batch's problems as keep the answer within a board's 1 KB receive buffer
    (the first few are enough to fix the firmware)."""
    listed, size = [problems[0]], len(json.dumps(problems[0], ensure_ascii=False).encode())
    for problem in problems[1:]:
        size += len(json.dumps(problem, ensure_ascii=False).encode()) + 1
        if size > BATCH_PROBLEM_BYTES:
            break
        listed.append(problem)
    return listed


BATCH_PROBLEM_BYTES = 600  # the status line, headers and error text take the rest of 1 KB


INGEST_ROUTES = {"/api/v1/temperature_reading": post_reading, "/api/v1/readings": post_batch}


class Ingest:
    """The ingest routes as a plain ASGI app (see Post): POST with an API key, and every error
    answered as JSON."""

    def __init__(self, app: Starlette) -> None:
        self.app = app  # its state, filled in at start-up

    async def __call__(self, scope, receive, send) -> None:
        post = Post(self.app.state, scope, receive)
        headers = None
        try:
            if scope["method"] != "POST":
                raise ApiError(405, "Method Not Allowed", None, {"Allow": "POST"})
            check_key(post.state, post.client_ip, post.headers.get(b"x-api-key"))
            status, content = await INGEST_ROUTES[scope["path"]](post)
        except ApiError as error:
            REJECTED.labels(REJECT_REASONS.get(error.status, str(error.status))).inc()
            status, content, headers = error.status, error.content(), error.response_headers()
            if b"expect" in post.headers and not post.body_read:
                headers["Connection"] = "close"  # it may still send the body it was not asked for
        scope["state"]["sensor"], scope["state"]["status"] = post.sensor, status
        await send_json(send, status, content, headers)


async def send_json(send, status: int, content: object, headers: dict | None = None) -> None:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    for name, value in (headers or {}).items():
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def path_sensor(request: Request) -> str:
    sensor_id = request.path_params["sensor_id"]
    request.state.sensor = sensor_id[:64]
    return sensor_id


async def run_read(request: Request, function, *args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.reader, function, *args)


async def latest_reading(request: Request) -> Response:
    require_key(request)
    sensor_id = path_sensor(request)
    reading = await run_read(request, request.app.state.store.latest, sensor_id)
    if reading is None:
        raise ApiError(404, "unknown sensor", {"sensor_id": sensor_id[:64]})
    return JSONResponse(reading.as_dict(request.app.state.settings.timezone))


def query_time(request: Request, name: str, default: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        moment = parse_time(name, text)
    except ReadingError as error:
        raise ApiError(
            422,
            f"bad {name}: use RFC 3339 or epoch seconds",
            {"parameter": name, "message": error.message},
        ) from None
    if not 0 <= moment < YEAR_10000_MS:
        raise ApiError(422, f"bad {name}: a time from 1970 to 9999", {"parameter": name})
    return moment


def query_choice(request: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = request.query_params.get(name) or default
    if value not in choices:
        raise ApiError(422, f"bad {name}: use one of {', '.join(choices)}", {"parameter": name})
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name) or str(default)
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ApiError(422, f"bad {name}: a whole number from {low} to {high}", {"parameter": name})
    return int(text)


async def history(request: Request) -> Response:
    """Readings of one sensor in a time range, as JSON or CSV, raw or in time buckets."""
    require_key(request)
    sensor_id = path_sensor(request)
    now_ms = time.time_ns() // 1_000_000
    # By default the range reaches as far ahead as a stored timestamp can be.
    end_ms = query_time(request, "end", now_ms + FUTURE_SLACK_MS)
    start_ms = query_time(request, "start", now_ms - DEFAULT_HISTORY_MS)
    if start_ms > end_ms:
        raise ApiError(422, "bad start: it is after end", {"parameter": "start"})
    limit = query_int(request, "limit", 1000, 1, MAX_HISTORY_LIMIT)
    descending = query_choice(request, "order", ("asc", "desc"), "asc") == "desc"
    wants_csv = "text/csv" in request.headers.get("accept", "")
    kind = query_choice(request, "format", ("json", "csv"), "csv" if wants_csv else "json")
    every_text = request.query_params.get("every")
    every_ms = None
    if every_text:
        match = EVERY.fullmatch(every_text)
        if not match:
            raise ApiError(
                422, "bad every: a duration such as 30s, 1m, 1h or 1d", {"parameter": "every"}
            )
        every_ms = int(match[1]) * UNIT_MS[match[2]]

    store, settings = request.app.state.store, request.app.state.settings
    if every_ms:
        chunks = store.buckets(sensor_id, start_ms, end_ms, every_ms, limit, descending)
        header = ["time", "count"] + [
            f"{f}_{s}" for f in settings.fields for s in ("min", "mean", "max")
        ]
        to_row = lambda row: bucket_row(row, settings.fields)  # noqa: E731
    else:
        chunks = store.history(sensor_id, start_ms, end_ms, limit, descending)
        header = [
            "id",
            "sensor_id",
            "timestamp",
            *settings.fields,
            "date_recorded",
            "time_recorded",
            "clock",
            "client_ip",
        ]
        to_row = lambda reading: reading.as_dict(settings.timezone)  # noqa: E731
    rows = stream_rows(request, chunks, to_row)

    if kind == "csv":
        safe_name = re.sub(r"[^A-Za-z0-9_.:-]", "_", sensor_id)[:64]
        filename = f"{safe_name}_{'buckets' if every_ms else 'readings'}.csv"
        return StreamingResponse(
            csv_lines(header, rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    opening = {
        "sensor_id": sensor_id,
        "start": format_timestamp(start_ms),
        "end": format_timestamp(end_ms),
    }
    if every_ms:
        opening["every"] = every_text
    return StreamingResponse(
        json_document(opening, "buckets" if every_ms else "readings", rows),
        media_type="application/json",
    )


def bucket_row(row: tuple, fields: tuple[str, ...]) -> dict:
    """A bucket as {"time", "count", "<field>_min", "<field>_mean", "<field>_max", ...}."""
    entry = {"time": format_timestamp(row[0]), "count": row[1]}
    for index, name in enumerate(fields):
        count, total, low, high = row[2 + 4 * index : 6 + 4 * index]
        if count:
            entry.update({f"{name}_min": low, f"{name}_mean": total / count, f"{name}_max": high})
    return entry


async def stream_rows(request: Request, chunks: Iterator[list], to_row) -> AsyncIterator[dict]:
    """Fetch one chunk at a time on the reader thread, so other reads are not held up."""
    while True:
        chunk = await run_read(request, next, chunks, None)
        if chunk is None:
            return
        for item in chunk:
            yield to_row(item)


async def csv_lines(header: list[str], rows: AsyncIterator[dict]) -> AsyncIterator[str]:
    yield ",".join(header) + "\r\n"
    lines = []
    async for row in rows:
        lines.append(",".join(csv_cell(row.get(name)) for name in header))
        if len(lines) >= HISTORY_CHUNK:
            yield "\r\n".join(lines) + "\r\n"
            lines = []
    if lines:
        yield "\r\n".join(lines) + "\r\n"


def csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if any(character in text for character in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


async def json_document(opening: dict, key: str, rows: AsyncIterator[dict]) -> AsyncIterator[str]:
    """A JSON object whose list is written as it is read; the count comes last."""
    yield json.dumps(opening, separators=(",", ":"))[:-1] + f',"{key}":['
    count, parts = 0, []
    async for row in rows:
        parts.append(json.dumps(row, separators=(",", ":")))
        count += 1
        if len(parts) >= HISTORY_CHUNK:
            yield ("," if count > len(parts) else "") + ",".join(parts)
            parts = []
    if parts:
        yield ("," if count > len(parts) else "") + ",".join(parts)
    yield f'],"count":{count}}}'


async def sensors(request: Request) -> Response:
    """Every sensor with its first and last reading time, count, fields, and silence."""
    require_key(request)
    silent_after = query_int(request, "silent_after", 600, 1, 10 * 365 * 86400)
    settings = request.app.state.settings
    now_ms = time.time_ns() // 1_000_000
    entries = await run_read(request, request.app.state.store.sensors)
    body = [
        {
            "sensor_id": sensor_id,
            "first_seen": format_timestamp(first),
            "last_seen": format_timestamp(last),
            "count": count,
            "fields": fields,
            "silent": now_ms - last > silent_after * 1000,
            "latest": latest.as_dict(settings.timezone) if latest else None,
        }
        for sensor_id, first, last, count, fields, latest in entries
    ]
    return JSONResponse({"sensors": body, "silent_after": silent_after})


LIVE_PATH = "/ws/sensor_updates"


async def live_updates(scope, receive, send, state) -> None:
    """Send every stored reading (of one sensor, with ?sensor_id=) as one JSON message. Plain
    ASGI rather than a Starlette route: a subscriber may idle for days, and this way it holds
    no framework objects, only its own."""
    query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
    key = query.get("api-key") or first_header(scope, b"x-api-key")
    address = client_address(scope, state.settings.trusted_proxies)
    await receive()  # websocket.connect, always the first message
    await send({"type": "websocket.accept"})  # from here on, the headers are gone
    try:
        check_rate(state, "address " + address)
    except ApiError:
        await send_close(send, 1013, "too many requests: try again later")
        return
    if not keys_match(key, state.settings.ws_keys):
        await send_close(send, 1008, "missing or wrong API key")
        return
    sensor_id = query.get("sensor_id") or None
    if sensor_id is not None and not is_sensor_id(sensor_id):  # it would never match
        await send_close(send, 1008, "sensor_id must be 1-64 letters, digits or _ - . :")
        return
    subscriber = state.subscribers.join(key, sensor_id)
    if subscriber is None:
        await send_close(send, 1008, f"at most {state.settings.max_ws_per_key} connections per key")
        return
    await serve(subscriber, receive, send, state.subscribers)


def first_header(scope, name: bytes) -> str | None:
    for header, value in scope["headers"]:
        if header == name:
            return value.decode("latin-1")
    return None


async def serve(subscriber: Subscriber, receive, send, subscribers: Subscribers) -> None:
    # Two tasks per subscriber: this one waits for the client to go, the other sends. When
    # the subscriber overflows, this one is cancelled (see Subscribers.publish).
    subscriber.handler = asyncio.current_task()
    sender = asyncio.create_task(send_queued(send, subscriber))
    try:
        await wait_for_close(receive)
    except asyncio.CancelledError:
        if not subscriber.overflowed:
            raise
        sender.cancel()
        await close_quietly(send, 1008, "too slow: fell behind the live stream")
    finally:
        subscribers.leave(subscriber)
        sender.cancel()


async def send_queued(send, subscriber: Subscriber) -> None:
    try:
        while True:
            for message in await subscriber.inbox.take_all():
                await send({"type": "websocket.send", "text": message})
    except (RuntimeError, OSError):  # the connection is closing or gone
        pass


async def wait_for_close(receive) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass  # what a subscriber sends is not read


def send_close(send, code: int, reason: str):
    return send({"type": "websocket.close", "code": code, "reason": reason})


async def close_quietly(send, code: int, reason: str) -> None:
    try:
        await asyncio.wait_for(send_close(send, code, reason), timeout=1)
    except (TimeoutError, RuntimeError, OSError):
        pass


STALLED_SECONDS = 2  # a commit takes milliseconds: writes waiting this long are stuck


async def health(request: Request) -> Response:
    """State for people and monitors; 503 when no reading can be stored. No key, no paths."""
    state = request.app.state
    writer = state.writer
    try:  # a store that failed is tried again; a working one must still answer in time
        check = writer.probe() if writer.write_error is not None else writer.ping()
        await asyncio.wait_for(check, STALLED_SECONDS)
    except (StoreError, TimeoutError):
        pass
    writable, detail = writer.write_error is None, writer.write_error
    if writable and (stalled := writer.stalled_for()) >= STALLED_SECONDS:
        writable, detail = False, f"writes have waited {stalled:.0f} s for the disk or the lock"
    store = {"kind": "sqlite", "writable": writable, "detail": detail, "commits": writer.commits}
    healthy = writable
    if isinstance(state.store, InfluxStore):
        influx = state.store
        loop = asyncio.get_running_loop()
        backlog, oldest_ms, set_aside = await loop.run_in_executor(None, influx.outbox_state)
        now_ms = time.time_ns() // 1_000_000
        store.update(
            kind="influxdb",
            influxdb=influx.influx_state,
            influxdb_detail=influx.influx_detail,
            spool_backlog=backlog,
            spool_oldest_age_seconds=round((now_ms - oldest_ms) / 1000, 1) if oldest_ms else 0,
            set_aside=set_aside,
        )
        healthy = writable and influx.influx_state != "down" and not set_aside
    body = {
        "status": "healthy" if healthy else "degraded",
        "version": VERSION,
        "timestamp": format_timestamp(time.time_ns() // 1_000_000),
        "uptime_seconds": round(time.monotonic() - state.started, 1),
        "store": store,
        "subscribers": len(state.subscribers.live),
    }
    return JSONResponse(body, 200 if writable else 503)


async def ping(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


# The page loads nothing from elsewhere; the policy makes sure of it.
DASHBOARD_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


async def dashboard(request: Request) -> Response:
    headers = {"Content-Security-Policy": DASHBOARD_POLICY, "X-Content-Type-Options": "nosniff"}
    return FileResponse(HERE / "dashboard.html", headers=headers, media_type="text/html")


# --- API description (OpenAPI 3.1 at /openapi.json, readable at /docs) ---------------------

SENSOR_ID_PATTERN = "^[A-Za-z0-9_.:-]{1,64}$"
DECIMAL_PATTERN = rf"^\s*{PLAIN_DECIMAL.pattern}\s*$"
EPOCH_PATTERN = r"^\s*[+-]?0*(?:\d{1,15}(?:\.\d*)?|\.\d+)\s*$"  # what parse_time takes as epoch
TIMESTAMP = {"type": "string", "format": "date-time"}
COUNT = {"type": "integer", "minimum": 0}
TEXT = {"type": "string"}
OBJECT = {"type": "object"}
ERRORS = {
    400: "a request that cannot be read: malformed HTTP, JSON or form, or a body of a wrong shape",
    401: "missing or wrong API key",
    404: "no reading from this sensor",
    408: "the body did not arrive within REQUEST_TIMEOUT",
    413: "body over MAX_BODY_BYTES, or a batch over MAX_BATCH readings",
    415: "a content type other than JSON, text/plain or form",
    422: "invalid: detail names the field, the readings or the query parameter",
    429: "too many requests (RATE_LIMIT); the Retry-After header says when to retry",
    503: "the store cannot write; nothing was stored",
}
NEW_READING = (
    "Unknown keys are ignored. A timestamp before 2020 or more than 5 minutes ahead is replaced"
    " by the server's clock."
)
API_DESCRIPTION = """Boards post readings with an API key in the `X-API-Key` header.

Live updates (a WebSocket, which OpenAPI cannot describe as an operation): connect to
`/ws/sensor_updates?api-key=KEY`, or send the key in `X-API-Key`; add `&sensor_id=ID` to
follow one sensor. Every stored reading then arrives as one JSON text message shaped like
`Reading`. The server closes the socket with code 1008 for a wrong key, for more than
MAX_WS_CONNECTIONS_PER_KEY connections with one key and for a client that falls behind, and
with code 1013 when the address is over RATE_LIMIT."""


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def array(items: dict, **limits) -> dict:
    return {"type": "array", "items": items, **limits}


def closed(properties: dict, optional: Iterable[str] = (), **extra) -> dict:
    """A JSON object with exactly these properties, all required except the `optional` ones."""
    required = [name for name in properties if name not in optional]
    schema = {"type": "object", "properties": properties, "required": required, **extra}
    return schema | {"additionalProperties": False}


def answer(description: str, schema: dict = TEXT, media: str = "application/json") -> dict:
    return {"description": description, "content": {media: {"schema": schema}}}


def operation(method: str, summary: str, ok: dict, errors=(), key=True, **extra) -> dict:
    """One method of a path: its successful answers, then the errors it can give."""
    responses = {**ok}
    for status in (400, *errors, 401, 429) if key else (400, *errors):
        responses[str(status)] = answer(ERRORS[status], ref("Error"))
    if key:
        retry = {"required": True, "schema": {"type": "integer", "minimum": 1}}
        responses["429"]["headers"] = {"Retry-After": retry}
    public = {} if key else {"security": []}
    return {method: {"summary": summary, **extra, "responses": responses} | public}


def query(name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "description": description, "schema": schema}


def field_value(settings: Settings, name: str) -> dict:
    """A JSON number within the field's range, or a plain decimal string (checked on arrival)."""
    number = {"type": "number"}
    bounds = settings.ranges.get(name)
    if bounds is not None:
        number["minimum" if bounds.low_inclusive else "exclusiveMinimum"] = bounds.low
        number["maximum"] = bounds.high
    return {"anyOf": [number, {"type": "string", "pattern": DECIMAL_PATTERN}]}


def component_schemas(settings: Settings) -> dict:
    fields = settings.fields
    epoch = {"type": "number", "minimum": -1e15, "maximum": 1e15}
    device_time = [TIMESTAMP, epoch, {"type": "string", "pattern": EPOCH_PATTERN}, {"type": "null"}]
    sensor_id = {"type": "string", "pattern": SENSOR_ID_PATTERN}
    new_reading = {
        "sensor_id": sensor_id,
        **{name: field_value(settings, name) for name in fields},
        "timestamp": {"anyOf": device_time},
    }
    reading = {
        "id": {"type": "integer", "minimum": 1},
        "sensor_id": sensor_id,
        **{name: {"type": "number"} for name in fields},
        "timestamp": TIMESTAMP,
        "date_recorded": {"type": "string", "format": "date"},
        "time_recorded": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}:[0-9]{2}$"},
        "clock": {"enum": ["device", "server"]},
        "client_ip": TEXT,
    }
    window = {"sensor_id": TEXT, "start": TEXT, "end": TEXT}
    statistics = {f"^({'|'.join(fields)})_(min|mean|max)$": {"type": "number"}}
    bucket = closed({"time": TIMESTAMP, "count": COUNT}, patternProperties=statistics)
    clocks = closed({"device": COUNT, "server": COUNT})
    latest = {"anyOf": [ref("Reading"), {"type": "null"}]}
    return {
        "Error": closed({"error": TEXT, "detail": {}}),
        "NewReading": {
            "type": "object",
            "description": NEW_READING,
            "properties": new_reading,
            "required": ["sensor_id"],
            "anyOf": [{"required": [name]} for name in fields],  # at least one field
        },
        "Reading": closed(reading, optional=fields),
        "BatchResult": closed({"stored": COUNT, "duplicates": COUNT, "clock": clocks}),
        "History": closed({**window, "count": COUNT, "readings": array(ref("Reading"))}),
        "Buckets": closed({**window, "every": TEXT, "count": COUNT, "buckets": array(bucket)}),
        "Sensor": closed(
            {"sensor_id": TEXT, "first_seen": TIMESTAMP, "last_seen": TIMESTAMP, "count": COUNT}
            | {"fields": array(TEXT), "silent": {"type": "boolean"}, "latest": latest}
        ),
        "Health": closed(
            {"status": {"enum": ["healthy", "degraded"]}, "version": TEXT, "timestamp": TIMESTAMP}
            | {"uptime_seconds": {"type": "number", "minimum": 0}, "subscribers": COUNT}
            | {"store": OBJECT | {"required": ["kind", "writable"]}}
        ),
    }


def openapi_document(settings: Settings) -> dict:
    """This server's HTTP API as OpenAPI 3.1, with the configured fields, ranges and limits."""
    # `.` and `..` are valid sensor ids, but reach the server only written as %2E: clients
    # otherwise take them for directory steps.
    sensor_path = {"type": "string", "pattern": SENSOR_ID_PATTERN, "not": {"enum": [".", ".."]}}
    sensor = {"name": "sensor_id", "in": "path", "required": True, "schema": sensor_path}
    new_reading = {"schema": ref("NewReading")}
    one = {"application/json": new_reading, "application/x-www-form-urlencoded": new_reading}
    batch = array(ref("NewReading"), minItems=1, maxItems=settings.max_batch)
    wrapped = {"type": "object", "properties": {"readings": batch}, "required": ["readings"]}
    many = {"application/json": {"schema": {"anyOf": [batch, wrapped]}}}
    reading = answer("the stored reading", ref("Reading"))
    batch_result = answer("how many were stored, how many were duplicates", ref("BatchResult"))
    history = answer("readings; buckets with `every`", {"anyOf": [ref("History"), ref("Buckets")]})
    history["content"]["text/csv"] = {"schema": TEXT}
    when = {"anyOf": [TIMESTAMP, {"type": "string", "pattern": EPOCH_PATTERN}, {"const": ""}]}
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_LIMIT, "default": 1000}
    every = {"type": "string", "pattern": "^([1-9][0-9]{0,5}[smhd])?$"}
    silent_after = {"type": "integer", "minimum": 1, "maximum": 10 * 365 * 86400, "default": 600}
    sensors = closed({"sensors": array(ref("Sensor")), "silent_after": {"type": "integer"}})
    health = answer("healthy, or degraded but storing", ref("Health"))
    page = answer("an HTML page", media="text/html")
    ingest_errors = (400, 408, 413, 415, 422, 503)
    paths = {
        "/api/v1/temperature_reading": operation(
            "post",
            "Store one reading (200 with the stored one when it is a duplicate)",
            {"201": reading, "200": reading},
            ingest_errors,
            requestBody={"required": True, "content": one},
        ),
        "/api/v1/readings": operation(
            "post",
            "Store a batch of readings: all of them or none (200 when all are duplicates)",
            {"201": batch_result, "200": batch_result},
            ingest_errors,
            requestBody={"required": True, "content": many},
        ),
        "/api/v1/sensor/{sensor_id}/latest": operation(
            "get", "The sensor's latest reading", {"200": reading}, (404,), parameters=[sensor]
        ),
        "/api/v1/sensor/{sensor_id}/readings": operation(
            "get",
            "History as JSON, or CSV (format=csv or Accept: text/csv), raw or in time buckets",
            {"200": history},
            (422,),
            parameters=[
                sensor,
                query("start", "RFC 3339 or epoch seconds; default: 24 hours ago", when),
                query("end", "RFC 3339 or epoch seconds; default: 5 minutes ahead", when),
                query("limit", "at most this many rows", limit),
                query("order", "by time", {"enum": ["asc", "desc"], "default": "asc"}),
                query("format", "of the answer", {"enum": ["json", "csv"], "default": "json"}),
                query("every", "bucket length, such as 30s, 15m, 1h or 1d", every),
            ],
        ),
        "/api/v1/sensors": operation(
            "get",
            "Every sensor, with silent ones marked",
            {"200": answer("the sensors", sensors)},
            (422,),
            parameters=[query("silent_after", "seconds without a reading", silent_after)],
        ),
        "/api/v1/health": operation(
            "get",
            "State of the server and its store",
            {"200": health, "503": answer("no reading can be stored", ref("Health"))},
            key=False,
        ),
        "/api/v1/ping": operation(
            "get",
            "Liveness",
            {"200": answer("alive", closed({"status": {"const": "ok"}}))},
            key=False,
        ),
        "/metrics": operation(
            "get",
            "Prometheus metrics (without a key when METRICS_PUBLIC is set)",
            {"200": answer("Prometheus text format", media="text/plain")},
            key=not settings.metrics_public,
        ),
        "/": operation("get", "The dashboard", {"200": page}, key=False),
        "/openapi.json": operation(
            "get", "This description", {"200": answer("OpenAPI 3.1", OBJECT)}, key=False
        ),
        "/docs": operation("get", "This description as a page", {"200": page}, key=False),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "SensorFlow Server", "version": VERSION, "description": API_DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": component_schemas(settings),
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"apiKey": []}],
    }


# The page loads nothing from elsewhere; this policy has the browser hold it to that.
DOCS_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_document(request.app.state.settings))


async def docs(request: Request) -> Response:
    headers = {"Content-Security-Policy": DOCS_POLICY}
    return FileResponse(HERE / "docs.html", media_type="text/html", headers=headers)


# --- App assembly ---------------------------------------------------------------------------


async def api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error.content(), error.status, error.response_headers())


async def http_error(request: Request, error: HTTPException) -> Response:
    return JSONResponse({"error": error.detail, "detail": None}, error.status_code, error.headers)


async def metrics(request: Request) -> Response:
    if not request.app.state.settings.metrics_public:
        require_key(request)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class Front:
    """In front of everything: hands the live route to live_updates; for every HTTP request,
    resolves the client address, sends the ingest routes to Ingest and the rest to Starlette,
    then logs one line (method, path, status, milliseconds, sensor, client address) and counts
    it for /metrics."""

    def __init__(
        self, app: Starlette, ingest, cors: bool, trusted: tuple[IPNetwork, ...], log_line
    ) -> None:
        self.app = app
        self.ingest = ingest
        self.ingest_notes_status = not cors  # CORS answers preflight requests on its own
        self.trusted = trusted
        self.log_line = log_line
        self.counted: dict[tuple[str, int], tuple] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket" and scope["path"] == LIVE_PATH:
            return await live_updates(scope, receive, send, self.app.state)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["client_ip"] = client_address(scope, self.trusted)
        state["status"] = 500
        started = time.perf_counter()

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        ingest = scope["path"] in INGEST_ROUTES
        try:
            if ingest and self.ingest_notes_status:
                await self.ingest(scope, receive, send)  # every reading: one layer less
            else:
                await (self.ingest if ingest else self.app)(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - started
            route = scope["path"] if ingest else getattr(scope.get("route"), "path", "unmatched")
            self.count(route, state["status"], seconds)
            if log.isEnabledFor(logging.INFO):
                self.log_line(request_line(scope, state["status"], seconds))

    def count(self, route: str, status: int, seconds: float) -> None:
        counted = self.counted.get((route, status))
        if counted is None:  # looked up once per route and status, not once per request
            counted = REQUESTS.labels(route, status), LATENCY.labels(route)
            self.counted[(route, status)] = counted
        counted[0].inc()
        counted[1].observe(seconds)


def request_line(scope, status: int, seconds: float) -> str:
    state = scope["state"]
    return (
        f"{scope['method']} {printable(scope['path'])} {status} {seconds * 1000:.1f}ms"
        f" sensor={printable(state.get('sensor') or '-')} client={state['client_ip'] or '-'}"
    )


def printable(text: str) -> str:
    """What a client sent, made safe to log: no line breaks or control characters to forge
    log lines with, and not too long."""
    text = text[:120]
    return text if text.isascii() and text.isprintable() else UNPRINTABLE.sub("?", text)


UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def build_app(settings: Settings, writer: WriterProcess, log_line=log.info) -> Front:
    """The application around a started writer process and the store it opened (main starts
    it, to fail early and clearly). log_line writes a request's line at INFO."""
    local = writer.store

    @asynccontextmanager
    async def lifespan(app: Starlette):
        store = InfluxStore(settings, local) if settings.influx_host else local
        subscribers = Subscribers(settings.max_ws_per_key, settings.ws_queue_size)
        SUBSCRIBERS.set_function(lambda: len(subscribers.live))
        app.state.settings = settings
        app.state.store = store
        app.state.subscribers = subscribers
        app.state.limiter = RateLimiter(*settings.rate_limit) if settings.rate_limit else None
        app.state.clock = ServerClock(local.last_server_ms)
        app.state.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensorflow-read")
        app.state.writer = writer
        app.state.started = time.monotonic()
        await writer.attach(subscribers, settings.timezone)
        delivery = None
        if isinstance(store, InfluxStore):
            delivery = asyncio.create_task(deliver_forever(store, writer.committed))
        everywhere = settings.host in ("0.0.0.0", "::")
        shown_host = "<this machine's address>" if everywhere else settings.host
        if isinstance(store, InfluxStore):
            log.info("SensorFlow %s storing readings in InfluxDB database %s at %s, spooled in %s",
                     VERSION, settings.influx_database, settings.influx_host,
                     settings.sqlite_path.resolve())  # fmt: skip
        else:
            log.info(
                "SensorFlow %s storing readings in %s", VERSION, settings.sqlite_path.resolve()
            )
        log.info(
            "send readings to http://%s:%d/api/v1/temperature_reading; dashboard at /",
            shown_host,
            settings.port,
        )
        yield
        await writer.stop()
        if delivery is not None:
            delivery.cancel()
        app.state.reader.shutdown(wait=True)
        store.close()
        if store is not local:
            local.close()
        log.info("SensorFlow stopped")

    routes = [
        Route("/api/v1/sensor/{sensor_id}/latest", latest_reading),
        Route("/api/v1/sensor/{sensor_id}/readings", history),
        Route("/api/v1/sensors", sensors),
        Route("/api/v1/health", health),
        Route("/api/v1/ping", ping),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi_json),
        Route("/docs", docs),
        Route("/", dashboard),
    ]
    cors = {}
    if settings.cors_origins:
        cors = dict(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
            max_age=600,
        )
    app = Starlette(
        routes=routes,
        middleware=[Middleware(CORSMiddleware, **cors)] if cors else [],
        lifespan=lifespan,
        exception_handlers={ApiError: api_error, HTTPException: http_error},
    )
    ingest = CORSMiddleware(Ingest(app), **cors) if cors else Ingest(app)
    return Front(app, ingest, bool(cors), settings.trusted_proxies, log_line)


def raw_error(status: str, error: str, detail: str) -> bytes:
    """A whole JSON error response, for the few errors sent below the web framework."""
    body = json.dumps({"error": error, "detail": detail}, separators=(",", ":")).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


MAX_HEADER_BYTES = 64 * 1024
HEADERS_TOO_LARGE = raw_error(
    "431 Request Header Fields Too Large", "request headers too large", "at most 64 KiB"
)
UNREADABLE_REQUEST = raw_error(
    "400 Bad Request", "malformed HTTP request", "the request line or headers cannot be parsed"
)
BODY_TOO_SLOW = raw_error(
    "408 Request Timeout", "body too slow", "send the whole request within REQUEST_TIMEOUT"
)


def request_deadline_protocol(timeout: float):
    """uvicorn's httptools protocol, plus limits on each request: its headers and body must
    arrive within REQUEST_TIMEOUT (or the client gets 408, or is dropped while still sending
    headers), so idle or trickling connections cannot pile up; and headers past 64 KiB are
    refused before the parser spends time on them."""
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class RequestDeadlineProtocol(HttpToolsProtocol):
        deadlines: Deadlines | None = None  # one for every connection, made with the first
        reading_headers = False
        header_bytes = 0

        def connection_made(self, transport) -> None:
            # As uvicorn's own, but with the addresses the transport noted when it accepted
            # the connection: uvicorn asks the socket again, through a socket object per call.
            self.connections.add(self)
            self.transport = transport
            self.flow = FlowControl(transport)
            self.server = address_pair(transport.get_extra_info("sockname"))
            self.client = address_pair(transport.get_extra_info("peername"))
            self.scheme = "http"
            if RequestDeadlineProtocol.deadlines is None:
                RequestDeadlineProtocol.deadlines = Deadlines(self.loop, timeout)
            self.start_deadline()  # a connection's first request is timed from its start

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self not in self.deadlines.due:
                self.start_deadline()

        def data_received(self, data: bytes) -> None:
            was_reading_headers = self.reading_headers
            if was_reading_headers and self.header_bytes + len(data) > MAX_HEADER_BYTES:
                end = data.find(b"\r\n\r\n")  # headers and body may come in one read
                if end < 0 or self.header_bytes + end > MAX_HEADER_BYTES:
                    return self.refuse_headers()
            super().data_received(data)
            if was_reading_headers and self.reading_headers:  # the headers are still coming
                self.header_bytes += len(data)
                if self.header_bytes > MAX_HEADER_BYTES:
                    self.refuse_headers()

        def refuse_headers(self) -> None:
            if not self.transport.is_closing():
                self.close_with(HEADERS_TOO_LARGE)

        def send_400_response(self, message: str) -> None:
            self.close_with(UNREADABLE_REQUEST)  # JSON like every other error

        def close_with(self, answer: bytes) -> None:
            self.deadlines.stop(self)
            self.transport.write(answer)
            self.transport.close()

        def on_headers_complete(self) -> None:
            self.reading_headers = False
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.transport is self.transport:
                self.cycle.transport = JoinedWrites(self.transport, self.scope["method"])

        def on_message_complete(self) -> None:
            self.deadlines.stop(self)
            super().on_message_complete()

        def connection_lost(self, exc) -> None:
            self.deadlines.stop(self)
            super().connection_lost(exc)

        def start_deadline(self) -> None:
            self.reading_headers, self.header_bytes = True, 0
            self.deadlines.start(self)

        def too_slow(self) -> None:
            if self.transport.is_closing():
                return
            if self.flow.read_paused:  # we are not reading (a pipelined request waits its turn)
                self.deadlines.start(self)
                return
            if self.reading_headers:
                log.info("dropped a connection whose request headers took over %g s", timeout)
                self.transport.close()
            elif self.cycle is not None and not self.cycle.response_started:
                self.close_with(BODY_TOO_SLOW)
            else:
                self.transport.close()

    return RequestDeadlineProtocol


def address_pair(address) -> tuple[str, int] | None:
    """(host, port) of a socket address as the transport gives it (IPv6 adds two more)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class Deadlines:
    """The request deadline of every connection, checked by one timer a few times a second. A
    timer per request, made and then cancelled for nearly every request, cost more."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.period = min(1.0, timeout / 4)  # a slow client is cut off at most this late
        self.due: dict[object, float] = {}  # connection -> when its time is up
        self.timer: asyncio.TimerHandle | None = None

    def start(self, connection) -> None:
        self.due[connection] = time.monotonic() + self.timeout
        if self.timer is None:
            self.timer = self.loop.call_later(self.period, self.check)

    def stop(self, connection) -> None:
        self.due.pop(connection, None)

    def check(self) -> None:
        now = time.monotonic()
        for connection, due in list(self.due.items()):
            if due <= now:
                del self.due[connection]
                connection.too_slow()
        self.timer = self.loop.call_later(self.period, self.check) if self.due else None


class JoinedWrites:
    """The connection as one response sees it: the status line and headers wait for the body
    and leave with it, in one write() (one system call, one packet) instead of two. uvicorn
    writes a body after the headers of every answer but one to HEAD, and closes the
    connection if the application fails in between."""

    __slots__ = ("transport", "hold", "head")

    def __init__(self, transport, method: str) -> None:
        self.transport = transport
        self.hold = method != "HEAD"
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # the client has gone (uvicorn marks only its newest request as disconnected)
        if self.head is not None:
            data, self.head = self.head + data, None
        elif self.hold and not data.startswith(b"HTTP/1.1 100 "):  # 100 Continue: send now
            self.hold = False
            self.head = data
            return
        self.transport.write(data)

    def close(self) -> None:
        if self.head is not None:
            self.transport.write(self.head)
            self.head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def websocket_protocol():
    """uvicorn's WebSocket protocol, made to cut off a client that stopped reading (closing a
    connection waits for the peer to take what is buffered, which a stalled one never does),
    and made small: a subscriber may stay connected for days, mostly idle."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    class CuttingWebSocketProtocol(WebSocketsSansIOProtocol):
        # Slots keep these out of the instance dictionary: with 30 names or more, a dictionary
        # no longer shares its keys with the other connections' and costs 1.3 KB more.
        __slots__ = (
            "request",
            "response",
            "scope",
            "queue",
            "writable",
            "frames",
            "curr_msg_data_type",
            "ping_timer",
            "pong_timer",
            "pending_ping_payload",
            "ping_sent_at",
            "last_ping_rtt",
        )

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.queue = Inbox()
            self.writable = Gate()

        async def send(self, message) -> None:
            await super().send(message)
            if message["type"] == "websocket.accept":
                self.forget_handshake()

        def forget_handshake(self) -> None:
            """Drop the headers only the handshake needed (the application has read them by
            the time it accepts). websockets' frame parser holds on to the request till the
            connection ends, so its headers are emptied rather than let go."""
            self.request.headers.clear()
            self.request = self.response = None
            self.scope["headers"] = []

        async def run_asgi(self) -> None:
            await super().run_asgi()
            self.loop.call_later(CLOSE_GRACE_SECONDS, self.transport.abort)

    return CuttingWebSocketProtocol


class Gate:
    """Open while the connection may be written to, in place of an asyncio.Event, which costs
    a deque (760 bytes) on every connection though few ever wait. One writer at a time, as
    ASGI's send is used."""

    __slots__ = ("is_open", "opening")

    def __init__(self) -> None:
        self.is_open = True
        self.opening: asyncio.Future | None = None

    def set(self) -> None:
        self.is_open = True
        if self.opening is not None and not self.opening.done():
            self.opening.set_result(None)

    def clear(self) -> None:
        self.is_open = False

    async def wait(self) -> None:
        while not self.is_open:
            self.opening = asyncio.get_running_loop().create_future()
            await self.opening


CLOSE_GRACE_SECONDS = 2
MAX_SUBSCRIBER_MESSAGE = 4096  # subscribers have nothing to send: buffer little for them
SOCKET_SEND_BUFFER = 128 * 1024


def listening_socket(host: str, port: int) -> socket.socket:
    """The server socket. A fixed send buffer (inherited by every connection) bounds what a
    client that stops reading can hold up, so a stalled subscriber is noticed and dropped."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
    return sock


class HideKeys(logging.Filter):
    """Hides API keys in what libraries log: uvicorn logs each WebSocket's path with its query
    string (where the key's name may even be percent-encoded), and at DEBUG the WebSocket
    handshake logs the request headers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "key" in message.lower() or "%" in message:
            hidden = QUERY_PART.sub(hide_key_part, KEY_HEADER.sub(r"\1[hidden]", message))
            if hidden != message:
                record.msg, record.args = hidden, ()
        return True


QUERY_PART = re.compile(r"([?&])([^=&\s\"']*)=([^&\s\"']*)")
KEY_HEADER = re.compile(
    r"((?:x-api-key|authorization|cookie|sec-websocket-protocol):[ \t]*)[^\r\n]+", re.IGNORECASE
)


def hide_key_part(part: re.Match) -> str:
    name = unquote_plus(part[2]).lower()
    if "key" in name or "token" in name:  # also api_key and the like, refused but logged
        return f"{part[1]}{part[2]}=[hidden]"
    return part[0]


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as LineWriter.info_line


class LineWriter(logging.Handler):
    """Formats each record where it is logged and writes the lines out together, a few times
    a second, from a thread of its own. A request's log line then costs the event loop a
    string and an append: no write() to a slow terminal or pipe, and no thread woken per line
    (a hand-off per line cost more than the line itself)."""

    def __init__(self, stream, interval: float = 0.1) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self.lines: deque[str] = deque()  # append and popleft are safe across threads
        self.second, self.second_text = 0, ""
        self.writing = threading.Lock()  # not the handler's own lock: emit must never wait
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="sensorflow-log", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def info_line(self, message: str) -> None:
        """An INFO line of ours, formatted as the records are but with no LogRecord made: the
        one line per request adds up."""
        now = time.time()
        if int(now) != self.second:
            self.second = int(now)
            self.second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        self.add(f"{self.second_text},{int(now % 1 * 1000):03d} INFO sensorflow: {message}")

    def add(self, line: str) -> None:
        self.lines.append(line + "\n")
        if self.stopped.is_set():  # no thread to write it any more
            self.flush()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        with self.writing:  # the writing thread, and logging's own flush at exit
            lines = [self.lines.popleft() for _ in range(len(self.lines))]
            if lines:
                self.stream.write("".join(lines))
                self.stream.flush()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.flush()
        super().close()


def start_logging(level: str) -> LineWriter:
    output = LineWriter(sys.stderr)
    output.setFormatter(logging.Formatter(LOG_FORMAT))
    output.addFilter(HideKeys())
    logging.basicConfig(level=level, handlers=[output])
    return output


def lock_database(path: Path):
    """One server per database: a second one would hand out the same reading ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError("another SensorFlow server is using it") from None
    return lock


def raise_open_file_limit() -> None:
    """Many boards and subscribers mean many sockets: use all the descriptors allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    import uvicorn

    try:
        settings = load_settings()
    except SettingsError as error:
        sys.exit(f"SensorFlow cannot start: {error}")
    try:
        lock = lock_database(settings.sqlite_path)
        writer = WriterProcess(
            SQLiteStore(settings.sqlite_path, settings.fields, outbox=bool(settings.influx_host))
        )
        gc.freeze()  # start-up's objects live as long as the server: spare the collector
        problem = writer.start()  # before any thread starts
        if problem is None:
            writer.store.open_reader()
    except (OSError, sqlite3.Error) as error:
        problem = str(error)
    if problem is not None:
        sys.exit(f"SensorFlow cannot use the database {settings.sqlite_path}: {problem}")
    log_lines = start_logging(settings.log_level)
    # One line per request is logged: skip the record fields the format never shows.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    settings = ensure_api_key(settings)
    if any(len(key) < SHORT_KEY for key in settings.api_keys + settings.ws_keys):
        log.warning("an API key is shorter than %d characters: easy to guess", SHORT_KEY)
    raise_open_file_limit()
    config = uvicorn.Config(
        build_app(settings, writer, log_lines.info_line),
        http=request_deadline_protocol(settings.request_timeout),
        ws=websocket_protocol(),
        # Compression would hold zlib state of a few hundred KB on every browser's connection,
        # to shrink messages of a few hundred bytes.
        ws_per_message_deflate=False,
        ws_max_size=MAX_SUBSCRIBER_MESSAGE,
        timeout_graceful_shutdown=10,  # a client holding an export open cannot stall a restart
        log_config=None,  # our logging set-up above, with keys hidden
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as error:
        sys.exit(f"SensorFlow cannot listen on {settings.host}:{settings.port}: {error}")
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, end_by_signal(log_lines))
    server = uvicorn.Server(config)
    writer.on_lost = lambda: setattr(server, "should_exit", True)
    gc.freeze()
    server.run(sockets=[sock])
    lock.close()
    log_lines.close()
    if writer.lost:
        sys.exit("SensorFlow stopped: the store's writer process ended unexpectedly")


def end_by_signal(log_lines: LineWriter):
    """After a graceful stop uvicorn raises the signal that stopped it again, to end the
    process the way the signal would: write out the last log lines first."""

    def handler(number: int, frame) -> None:
        log_lines.close()
        signal.signal(number, signal.SIG_DFL)
        signal.raise_signal(number)

    return handler


if __name__ == "__main__":
    main()
