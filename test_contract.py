"""The server keeps to its own OpenAPI description, and its reading parser holds up to anything.

Schemathesis generates requests from /openapi.json and checks every answer against it;
Hypothesis feeds the reading parser, and the real ingest routes, arbitrary JSON and bytes.
"""

import json
import math
import re
import time
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.routing import Route

import app
from conftest import API_KEY

SENSOR_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
FIELDS = ("temperature", "humidity", "pressure")
JSON_ROUTE, BATCH_ROUTE = "/api/v1/temperature_reading", "/api/v1/readings"
INGEST_PATHS = (JSON_ROUTE, BATCH_ROUTE)
EARLIEST_DEVICE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
FUTURE_SLACK_MS = 5 * 60 * 1000


def within_default_range(field: str, value: float) -> bool:
    """The documented default FIELD_RANGES: temperature -100..1500, humidity 0..100,
    pressure above 0 up to 20000."""
    if field == "temperature":
        return -100 <= value <= 1500
    if field == "humidity":
        return 0 <= value <= 100
    return 0 < value <= 20000


# --- Arbitrary JSON, and JSON that looks like a reading ---------------------------------------

HUGE_NUMBERS = st.sampled_from([10**400, -(10**400), 2**64, 10**20, 1e308, -1e308, 5e-324])
NUMBERS = st.integers() | st.floats() | HUGE_NUMBERS  # floats include NaN and both infinities
DECIMAL_TEXT = NUMBERS.map(str) | st.from_regex(r"\A\s?[+-]?(\d{0,8}\.?\d{0,4}|\.\d{1,3})\s?\Z")
SCALARS = st.none() | st.booleans() | NUMBERS | DECIMAL_TEXT | st.text(max_size=20)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SENSOR_IDS = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z") | st.text(max_size=70) | JSON_VALUES
NOW_S = int(time.time())
TIMESTAMPS = (
    st.integers(NOW_S - 10 * 365 * 86400, NOW_S + 86400)
    | st.integers(NOW_S - 10 * 365 * 86400, NOW_S + 86400).map(lambda s: s * 1000)
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda moment: moment.isoformat())
    | NUMBERS
    | JSON_VALUES
)
READING_LIKE = st.fixed_dictionaries(
    {"sensor_id": SENSOR_IDS},
    optional={
        **{field: NUMBERS | DECIMAL_TEXT | JSON_VALUES for field in FIELDS},
        "timestamp": TIMESTAMPS,
        "firmware": JSON_VALUES,
    },
)
NEAR_RANGE = st.floats(-200, 20_100) | st.floats(-1, 101) | st.sampled_from([0, 100, 1500, 20_000])
PLAUSIBLE_READING = st.fixed_dictionaries(  # often valid, often just out of range
    {"sensor_id": st.from_regex(r"\A[A-Za-z0-9_.:-]{1,8}\Z"), "humidity": st.floats(-0.5, 100.5)},
    optional={"temperature": NEAR_RANGE | NUMBERS, "pressure": NEAR_RANGE | DECIMAL_TEXT},
)
DEFAULT_SETTINGS = app.load_settings({})


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON_VALUES | READING_LIKE)
@example(data={"sensor_id": "s", "temperature": 20, "timestamp": 10**400})
@example(data={"sensor_id": "s", "temperature": float("nan")})
@example(data={"sensor_id": "s", "humidity": "1e3"})
def test_parse_reading_returns_a_valid_reading_or_raises_reading_error(data):
    now_ms = time.time_ns() // 1_000_000

    try:
        reading = app.parse_reading(data, DEFAULT_SETTINGS, "127.0.0.1", now_ms)
    except app.ReadingError:
        return

    assert SENSOR_ID.fullmatch(reading.sensor_id)
    assert reading.values and set(reading.values) <= set(FIELDS)
    for field, value in reading.values.items():
        assert type(value) is float and math.isfinite(value), (field, value)
        assert within_default_range(field, value), (field, value)
    if reading.ts_ms is not None:
        assert type(reading.ts_ms) is int
        assert EARLIEST_DEVICE_MS <= reading.ts_ms <= now_ms + FUTURE_SLACK_MS


# --- The ingest routes, fed anything ---------------------------------------------------------


def json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN and Infinity tokens on purpose


FORM_BODIES = st.dictionaries(
    st.sampled_from(["sensor_id", *FIELDS, "timestamp"]) | st.text(max_size=6),
    DECIMAL_TEXT | st.text(max_size=12),
    max_size=5,
).map(lambda form: urlencode(form).encode())
BODIES = st.one_of(
    st.binary(max_size=300),
    FORM_BODIES,
    (JSON_VALUES | READING_LIKE | st.lists(READING_LIKE, max_size=5)).map(json_bytes),
    PLAUSIBLE_READING.map(json_bytes),
    st.lists(PLAUSIBLE_READING, min_size=1, max_size=5).map(json_bytes),
    st.fixed_dictionaries({"readings": st.lists(PLAUSIBLE_READING, max_size=5)}).map(json_bytes),
)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/x-www-form-urlencoded", "text/plain", "", "text/csv"]
)


def in_path(sensor_id: str) -> str:
    """A sensor id as a path segment: `.` and `..` are valid ids, but clients would treat them
    as directory steps."""
    return quote(sensor_id, safe="").replace(".", "%2E")


def stored_readings(server) -> list[dict]:
    """Every stored reading of every sensor, whatever its timestamp."""
    sensors = server.get("/api/v1/sensors").json()["sensors"]
    end = int(time.time()) + 86400
    readings = []
    for sensor in sensors:
        path = f"/api/v1/sensor/{in_path(sensor['sensor_id'])}/readings"
        answer = server.get(path, params={"start": 0, "end": end, "limit": 100_000})
        assert answer.status_code == 200
        readings += answer.json()["readings"]
    assert len(readings) == sum(sensor["count"] for sensor in sensors)
    return readings


def assert_valid_reading(reading: dict) -> None:
    assert SENSOR_ID.fullmatch(reading["sensor_id"]), reading
    values = {field: reading[field] for field in FIELDS if field in reading}
    assert values, reading
    for field, value in values.items():
        assert isinstance(value, float) and math.isfinite(value), reading
        assert within_default_range(field, value), reading


def test_ingest_routes_never_fail_and_store_only_finite_values_in_range(server):
    session = requests.Session()
    session.headers["X-API-Key"] = API_KEY
    edge = [
        {"sensor_id": "edge-1", "temperature": -100, "humidity": 100, "pressure": 20000},
        {"sensor_id": "edge-1", "temperature": 1500, "humidity": 0, "pressure": 1e-9},
    ]
    assert session.post(server.url + BATCH_ROUTE, json=edge, timeout=10).status_code == 201

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(INGEST_PATHS), content_type=CONTENT_TYPES, body=BODIES)
    @example(JSON_ROUTE, "application/json", b"[" * 100_000)
    @example(BATCH_ROUTE, "application/json", b'{"readings":' * 20_000)  # under the size limit
    @example(JSON_ROUTE, "application/json", b'{"sensor_id":"a","temperature":NaN}')
    @example(JSON_ROUTE, "application/json", b'{"sensor_id":"a","humidity":1e400}')
    @example(BATCH_ROUTE, "", b'[{"sensor_id":"a","humidity":1,"timestamp":1%s}]' % (b"0" * 400))
    @example(JSON_ROUTE, "application/x-www-form-urlencoded", b"sensor_id=a&pressure=-inf")
    @example(JSON_ROUTE, "application/json", b'{"sensor_id":"a","pressure":"\xff"}')
    @example(JSON_ROUTE, "application/json", b'{"sensor_id":"a","humidity":100.000001}')
    @example(JSON_ROUTE, "application/x-www-form-urlencoded", b"sensor_id=a&pressure=0")
    @example(BATCH_ROUTE, "text/plain", b'[{"sensor_id":"a","temperature":-100.5}]')
    def post_anything(path: str, content_type: str, body: bytes) -> None:
        headers = {"Content-Type": content_type} if content_type else {}

        answer = session.post(server.url + path, data=body, headers=headers, timeout=10)

        assert answer.status_code < 500, (answer.status_code, answer.text[:200])
        if path == JSON_ROUTE and answer.status_code in (200, 201):
            assert_valid_reading(answer.json())

    post_anything()

    readings = stored_readings(server)
    assert len(readings) >= len(edge)
    for reading in readings:
        assert_valid_reading(reading)


# --- The description itself ------------------------------------------------------------------


# Checks about answers. Left out on purpose: whether a request is accepted or refused
# (positive_data_acceptance, negative_data_rejection), since JSON Schema cannot say that a decimal
# string must lie within a field's range, or that start must not come after end.
ANSWER_CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.ignored_auth,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_matches_the_description(server, subtests, mode):
    readings = [  # something for the read routes to answer with
        {"sensor_id": "0", "temperature": 21.5, "humidity": 40, "pressure": 1013.25},
        {"sensor_id": "0", "temperature": 22, "timestamp": int(time.time()) - 60},
        {"sensor_id": "A", "humidity": 55.5, "timestamp": "2024-05-01T12:00:00Z"},
    ]
    assert server.post("/api/v1/readings", json=readings).status_code == 201
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    session = requests.Session()
    assert len(operations) >= 10

    for operation in operations:
        parts = (operation.path_parameters, operation.query, operation.headers, operation.body)
        if mode is GenerationMode.NEGATIVE and not any(parts):
            continue  # nothing in the request can be made invalid
        with subtests.test(operation=f"{operation.method.upper()} {operation.path}"):

            @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def answer_matches(case) -> None:
                case.call_and_validate(
                    session=session, headers={"X-API-Key": API_KEY}, checks=ANSWER_CHECKS
                )

            answer_matches()


def starlette_routes(config: app.Settings) -> list:
    store = app.SQLiteStore(config.sqlite_path, config.fields)
    application = app.build_app(config, app.WriterProcess(store))
    while not hasattr(application, "routes"):  # unwrap the layer in front of Starlette
        application = application.app
    return application.routes


def test_description_lists_every_route_with_its_methods(server):
    document = server.get("/openapi.json").json()
    routes = starlette_routes(app.load_settings({}))

    described = document["paths"]
    assert app.LIVE_PATH in document["info"]["description"]  # served in front of the router
    for route in routes:
        if not isinstance(route, Route):  # a WebSocket: described in words, not as an operation
            assert route.path in document["info"]["description"]
            continue
        methods = {method.lower() for method in route.methods} - {"head"}
        assert set(described.get(route.path, {})) == methods, route.path
    for path in app.INGEST_ROUTES:  # served before Starlette's router, POST only
        assert set(described.get(path, {})) == {"post"}, path
    served = {route.path for route in routes if isinstance(route, Route)} | set(app.INGEST_ROUTES)
    assert set(described) == served
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }


def test_description_follows_the_configured_fields_and_ranges(make_server):
    server = make_server(FIELDS="temperature,co2", FIELD_RANGES="co2:0:10000")

    schemas = server.get("/openapi.json").json()["components"]["schemas"]

    assert {"temperature", "co2"} <= set(schemas["Reading"]["properties"])
    assert "humidity" not in schemas["Reading"]["properties"]
    co2 = schemas["NewReading"]["properties"]["co2"]["anyOf"][0]
    assert (co2["minimum"], co2["maximum"]) == (0, 10000)


def test_docs_page_loads_nothing_from_outside_the_server(server):
    answer = server.get("/docs", key="")

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    for link in re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.IGNORECASE):
        assert not re.match(r"(?i)\s*(https?:)?//", link), link
    assert re.findall(r"fetch\(\s*[\"'`]([^\"'`]*)", page) == ["/openapi.json"]
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", page)
    assert "default-src 'none'" in answer.headers["content-security-policy"]


def test_docs_page_shows_every_operation_in_a_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"no Chromium binary at {chromium} (install the Debian package 'chromium')")
    document = server.get("/openapi.json").json()
    operations = [(method, path) for path, item in document["paths"].items() for method in item]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        requested, errors = [], []
        page.on("request", lambda request: requested.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.goto(server.url + "/docs")
        page.wait_for_selector("section")
        methods = page.locator("section h2 .method").all_text_contents()
        paths = page.locator("section h2 code").all_text_contents()
        browser.close()

    assert list(zip(methods, paths, strict=True)) == operations
    assert {urlsplit(url).netloc for url in requested} == {urlsplit(server.url).netloc}
    assert errors == []
