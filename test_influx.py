"""InfluxDB mode: every acknowledged reading reaches InfluxDB exactly once, outages included.

These tests run against the InfluxDB 3 stand-in (influx_standin.py), or against a real
InfluxDB 3 when INFLUX_TEST_HOST and INFLUX_TEST_TOKEN are set; tests that need to make the
database fail on purpose run on the stand-in only.
"""

import os
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from influxdb_client_3 import InfluxDBClient3

from conftest import API_KEY, Server
from influx_standin import StandIn

REAL_HOST = os.environ.get("INFLUX_TEST_HOST", "")
REAL_TOKEN = os.environ.get("INFLUX_TEST_TOKEN", "")
TOKEN = REAL_TOKEN or "apiv3_test-token"
needs_standin = pytest.mark.skipif(
    bool(REAL_HOST), reason="makes the database fail on purpose: stand-in only"
)


@pytest.fixture
def influx():
    """(host URL, stand-in or None)."""
    if REAL_HOST:
        yield REAL_HOST, None
        return
    standin = StandIn(TOKEN).start()
    yield standin.http_url, standin
    standin.stop()


@pytest.fixture
def database() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def influx_server(make_server, influx, database, tmp_path):
    host, _ = influx

    def make(folder=None, **env):
        settings = {"INFLUX_HOST": host, "INFLUX_TOKEN": TOKEN, "INFLUX_DATABASE": database}
        return make_server(folder=folder or tmp_path, **settings, **env)

    return make


def stored_rows(host: str, database: str) -> list[dict]:
    """Every row InfluxDB holds, read through the same client library our users have."""
    client = InfluxDBClient3(host=host, token=TOKEN, database=database)
    try:
        table = client.query('SELECT * FROM "sensor_readings"')
    except Exception as error:  # a database that has never been written to has no table
        if "not found" in str(error):
            return []
        raise
    finally:
        client.close()
    rows = table.to_pylist()
    for row, kind in zip(rows, [table.schema] * len(rows), strict=True):
        row["_schema"] = kind
    return rows


def wait_for_delivery(server: Server, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        store = requests.get(server.url + "/api/v1/health", timeout=5).json()["store"]
        if store["spool_backlog"] == 0 and store["influxdb"] == "up":
            return store
        time.sleep(0.2)
    raise AssertionError(f"the spool was not delivered in {timeout}s: {store}")


def post(server: Server, reading: dict) -> requests.Response:
    return server.post("/api/v1/temperature_reading", json=reading)


def test_10000_readings_from_50_clients_land_once_as_floats(influx, influx_server, database):
    server = influx_server()

    def client(number):
        session = requests.Session()
        statuses = []
        for index in range(200):
            answer = session.post(server.url + "/api/v1/temperature_reading",
                                  json={"sensor_id": f"fleet-{number}", "temperature": index % 40,
                                        "humidity": "50"},
                                  headers={"X-API-Key": API_KEY}, timeout=10)  # fmt: skip
            statuses.append(answer.status_code)
        return statuses

    with ThreadPoolExecutor(50) as pool:
        statuses = [status for result in pool.map(client, range(50)) for status in result]
    wait_for_delivery(server)

    rows = stored_rows(influx[0], database)
    assert statuses == [201] * 10_000
    assert len(rows) == 10_000
    assert len({(row["sensor_id"], row["time"]) for row in rows}) == 10_000
    schema = rows[0]["_schema"]
    assert str(schema.field("temperature").type) == "double"
    assert str(schema.field("humidity").type) == "double"
    assert str(schema.field("client_ip").type) in ("string", "large_string", "utf8")


def test_whole_number_then_decimal_both_land(influx, influx_server, database):
    server = influx_server()

    first = post(server, {"sensor_id": "int-first", "temperature": 25})
    second = post(server, {"sensor_id": "int-first", "temperature": 25.5})
    store = wait_for_delivery(server)

    values = sorted(row["temperature"] for row in stored_rows(influx[0], database))
    assert (first.status_code, second.status_code) == (201, 201)
    assert values == [25.0, 25.5]
    assert store["set_aside"] == 0


def test_sensor_id_is_the_tag_and_time_has_millisecond_precision(influx, influx_server, database):
    server = influx_server()

    stored = post(server, {"sensor_id": "tag-1", "temperature": 20,
                           "timestamp": "2026-11-30T12:00:00.123Z"}).json()  # fmt: skip
    wait_for_delivery(server)

    row = stored_rows(influx[0], database)[0]
    assert row["sensor_id"] == "tag-1" and row["client_ip"] == "127.0.0.1"
    assert row["time"].isoformat() == "2026-11-30T12:00:00.123000"
    assert stored["timestamp"] == "2026-11-30T12:00:00.123Z"


def stream_during_outage(server: Server, standin: StandIn, seconds: float, mode: str) -> list:
    """Post readings from two boards while the database is unavailable; return the answers."""
    answers, stop = [], threading.Event()

    def board(name):
        session, index = requests.Session(), 0
        while not stop.is_set() and index < 2000:
            answer = session.post(server.url + "/api/v1/temperature_reading",
                                  json={"sensor_id": name, "temperature": index % 50},
                                  headers={"X-API-Key": API_KEY}, timeout=10)  # fmt: skip
            answers.append(answer.status_code)
            index += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=board, args=(name,)) for name in ("out-a", "out-b")]
    for thread in threads:
        thread.start()
    time.sleep(1)
    standin.set_mode(mode)
    time.sleep(seconds)
    return answers, stop, threads


@needs_standin
def test_30_second_outage_loses_nothing_and_doubles_nothing(influx, influx_server, database):
    server = influx_server()
    standin = influx[1]

    answers, stop, threads = stream_during_outage(server, standin, 30, "refuse")
    during = requests.get(server.url + "/api/v1/health", timeout=5).json()
    readable = server.get("/api/v1/sensor/out-a/latest")
    standin.set_mode("normal")
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    wait_for_delivery(server)

    rows = stored_rows(influx[0], database)
    assert set(answers) == {201}
    assert during["status"] == "degraded" and during["store"]["influxdb"] == "down"
    assert during["store"]["spool_backlog"] > 100
    assert during["store"]["spool_oldest_age_seconds"] >= 20
    assert readable.status_code == 200
    assert len(rows) == len(answers)
    assert len({(row["sensor_id"], row["time"]) for row in rows}) == len(answers)


@needs_standin
def test_outage_with_a_server_killed_and_restarted_loses_nothing(influx, influx_server, database):
    server = influx_server()
    standin = influx[1]

    answers, stop, threads = stream_during_outage(server, standin, 8, "refuse")
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    server.kill()
    standin.set_mode("normal")
    again = influx_server()
    wait_for_delivery(again)

    rows = stored_rows(influx[0], database)
    assert set(answers) == {201}
    assert len(rows) == len(answers)
    assert len({(row["sensor_id"], row["time"]) for row in rows}) == len(answers)


@needs_standin
@pytest.mark.parametrize("mode", ["hang", "503"])
def test_hanging_or_unavailable_database_still_acknowledges_into_the_spool(
    influx, influx_server, database, mode
):
    server = influx_server(INFLUX_WRITE_TIMEOUT="1")
    standin = influx[1]
    standin.set_mode(mode)

    answers = [post(server, {"sensor_id": f"m-{mode}", "temperature": i}) for i in range(20)]
    time.sleep(1.5)
    during = requests.get(server.url + "/api/v1/health", timeout=5).json()["store"]
    standin.set_mode("normal")
    wait_for_delivery(server)

    assert [answer.status_code for answer in answers] == [201] * 20
    assert during["influxdb"] == "down" and during["spool_backlog"] > 0
    assert len(stored_rows(influx[0], database)) == 20


@needs_standin
def test_delivery_goes_on_after_the_spool_was_locked_longer_than_it_waits(influx, influx_server):
    server = influx_server(INFLUX_WRITE_TIMEOUT="1")
    standin = influx[1]
    standin.set_mode("503")
    answers = [post(server, {"sensor_id": "locked", "temperature": i}) for i in range(10)]

    holder = sqlite3.connect(server.db_path, isolation_level=None, timeout=10)
    holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock...
    standin.set_mode("normal")  # ...when the delivery is through and must update the spool
    time.sleep(8)  # it retries within 2 s, then waits 5 s for the lock and gives up
    holder.execute("ROLLBACK")
    holder.close()
    store = wait_for_delivery(server, timeout=30)
    server.stop()

    assert [answer.status_code for answer in answers] == [201] * 10
    assert store["spool_backlog"] == 0
    assert "the InfluxDB delivery cannot update the spool: database is locked" in server.log()
    assert len(stored_rows(influx[0], server.env["INFLUX_DATABASE"])) == 10


@needs_standin
def test_a_line_the_database_rejects_is_set_aside_and_the_rest_delivered(
    influx, influx_server, database
):
    server = influx_server(LOG_LEVEL="INFO")
    standin = influx[1]
    standin.reject_sensor("cursed")
    batch = [
        {"sensor_id": "fine-1", "temperature": 1, "timestamp": "2026-11-30T12:00:00Z"},
        {"sensor_id": "cursed", "temperature": 2, "timestamp": "2026-11-30T12:00:01Z"},
        {"sensor_id": "fine-2", "temperature": 3, "timestamp": "2026-11-30T12:00:02Z"},
    ]

    answer = server.post("/api/v1/readings", json=batch)
    time.sleep(1)
    health = requests.get(server.url + "/api/v1/health", timeout=5).json()
    post(server, {"sensor_id": "fine-3", "temperature": 4})
    wait_for_delivery(server)
    server.stop()

    sensors = sorted(row["sensor_id"] for row in stored_rows(influx[0], database))
    assert answer.status_code == 201
    assert sensors == ["fine-1", "fine-2", "fine-3"]
    assert health["store"]["set_aside"] == 1 and health["status"] == "degraded"
    assert "set aside" in server.log() and "cursed" in server.log()


def test_both_stores_answer_the_same(make_server, influx_server, tmp_path):
    embedded = make_server(folder=tmp_path / "embedded")
    influx = influx_server(folder=tmp_path / "influx")
    start = int(time.time() * 1000) - 3 * 3600 * 1000
    batch = [{"sensor_id": f"same-{i % 3}", "temperature": 10 + i % 17, "pressure": 1000 + i,
              **({"humidity": i % 90} if i % 2 else {}), "timestamp": start + i * 20_000}
             for i in range(300)]  # fmt: skip

    for server in (embedded, influx):
        assert server.post("/api/v1/readings", json=batch).status_code == 201
    wait_for_delivery(influx)

    for path, params in [
        ("/api/v1/sensor/same-1/latest", {}),
        ("/api/v1/sensor/same-2/readings", {}),
        ("/api/v1/sensor/same-2/readings", {"order": "desc", "limit": 17}),
        ("/api/v1/sensor/same-0/readings", {"every": "1h"}),
        ("/api/v1/sensor/same-0/readings", {"every": "15m", "format": "csv"}),
        ("/api/v1/sensor/nobody/readings", {}),
        ("/api/v1/sensor/nobody/latest", {}),
    ]:
        ours, theirs = embedded.get(path, params=params), influx.get(path, params=params)
        assert ours.status_code == theirs.status_code, path
        if params.get("format") == "csv":
            assert ours.text == theirs.text
        else:
            assert strip_times(ours.json()) == strip_times(theirs.json()), (path, params)
    sensors = [server.get("/api/v1/sensors").json() for server in (embedded, influx)]
    assert sensors[0] == sensors[1]


def strip_times(body: dict) -> dict:
    """Drop the range echoes, which differ by the milliseconds between the two requests."""
    if isinstance(body, dict):
        return {key: value for key, value in body.items() if key not in ("start", "end")}
    return body


@needs_standin
def test_reads_during_an_outage_include_spooled_readings(influx, influx_server):
    server = influx_server()
    influx[1].set_mode("refuse")

    stored = post(server, {"sensor_id": "during", "temperature": 12.5}).json()
    latest = server.get("/api/v1/sensor/during/latest")
    history = server.get("/api/v1/sensor/during/readings")
    influx[1].set_mode("normal")

    assert latest.status_code == 200 and latest.json() == stored
    assert history.json()["readings"] == [stored]
