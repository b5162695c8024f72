"""SensorFlow Server, specified by its behaviour against a real uvicorn server on 127.0.0.1."""

import base64
import contextlib
import csv
import io
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import API_KEY, WS_KEY, Server

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def raw_request(server: Server, request: bytes, read_size: int = 1024) -> bytes:
    """Send exact bytes the way a board does and read the answer into one small buffer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while len(received) < read_size:
            chunk = sock.recv(read_size - len(received))
            if not chunk:
                break
            received += chunk
        return received


def pico_request(body: bytes, key: str = API_KEY) -> bytes:
    return (
        b"POST /api/v1/temperature_reading HTTP/1.1\r\n"
        b"Host: 192.168.1.50\r\n"
        b"x-api-key: " + key.encode() + b"\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n\r\n" + body
    )


def post_reading(server: Server, reading: dict, **kwargs) -> requests.Response:
    return server.post("/api/v1/temperature_reading", json=reading, **kwargs)


def stored_count(server: Server) -> int:
    sensors = server.get("/api/v1/sensors").json()["sensors"]
    return sum(sensor["count"] for sensor in sensors)


def ms_ago(milliseconds: int) -> int:
    return int(time.time() * 1000) - milliseconds


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- Ingest: what a real board sends --------------------------------------------------------


def test_pico_w_request_bytes_get_201_within_one_1kb_read(server):
    body = (
        b'{"sensor_id":"e6614103e7696d2b","temperature":21.5,'
        b'"humidity":"55.20","pressure":"1013.25"}'
    )

    answer = raw_request(server, pico_request(body))

    assert answer.startswith(b"HTTP/1.1 201 ")
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert len(answer) < 512
    assert int(re.search(rb"(?i)content-length: (\d+)", head)[1]) == len(payload)
    latest = server.get("/api/v1/sensor/e6614103e7696d2b/latest").json()
    assert latest["humidity"] == 55.2 and latest["pressure"] == 1013.25
    assert latest["temperature"] == 21.5


def test_stored_reading_answer_has_every_documented_key(make_server):
    server = make_server(TIMEZONE="Asia/Tokyo")

    answer = post_reading(server, {"sensor_id": "lab-1", "temperature": 25})

    assert answer.status_code == 201
    reading = answer.json()
    assert set(reading) == {
        "id", "sensor_id", "temperature", "timestamp", "date_recorded", "time_recorded",
        "clock", "client_ip",
    }  # fmt: skip
    assert isinstance(reading["temperature"], float)
    assert RFC3339_MS.fullmatch(reading["timestamp"])
    utc = datetime.strptime(reading["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    tokyo = utc + timedelta(hours=9)
    assert reading["date_recorded"] == tokyo.strftime("%Y-%m-%d")
    assert reading["time_recorded"] == tokyo.strftime("%H:%M:%S")
    assert reading["client_ip"] == "127.0.0.1"
    assert reading["clock"] == "server"


def test_form_encoded_reading_is_accepted(server):
    answer = server.post(
        "/api/v1/temperature_reading",
        data={"sensor_id": "uno-1", "temperature": "19.25", "humidity": "40"},
    )

    assert answer.status_code == 201
    assert answer.json()["temperature"] == 19.25 and answer.json()["humidity"] == 40.0


def test_missing_and_text_plain_content_type_are_read_as_json(server):
    body = b'{"sensor_id":"plain-1","temperature":"20.5"}'
    without_type = pico_request(body).replace(b"content-type: application/json\r\n", b"")
    text_plain = pico_request(body).replace(b"application/json", b"text/plain")

    first = raw_request(server, without_type)
    second = raw_request(server, text_plain)

    assert first.startswith(b"HTTP/1.1 201 ")
    assert second.startswith(b"HTTP/1.1 201 ")
    assert stored_count(server) == 2


def test_json_labelled_as_form_is_read_as_json(server):
    answer = server.post(
        "/api/v1/temperature_reading",
        data=b'{"sensor_id":"curl-1","temperature":20}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert answer.status_code == 201


def test_other_content_type_is_refused_with_415(server):
    answer = server.post(
        "/api/v1/temperature_reading",
        data=b"<reading/>",
        headers={"Content-Type": "application/xml"},
    )

    assert answer.status_code == 415
    assert "application/json" in answer.json()["detail"]
    assert stored_count(server) == 0


def test_unknown_keys_are_ignored(server):
    answer = post_reading(server, {"sensor_id": "new-fw", "temperature": 20, "rssi": -70})

    assert answer.status_code == 201
    assert "rssi" not in answer.json()


def test_whole_number_then_decimal_are_both_floats(server):
    post_reading(server, {"sensor_id": "float-1", "temperature": 25})
    post_reading(server, {"sensor_id": "float-1", "temperature": 25.5})

    history = server.get("/api/v1/sensor/float-1/readings").json()["readings"]

    assert [reading["temperature"] for reading in history] == [25.0, 25.5]
    assert all(isinstance(reading["temperature"], float) for reading in history)


# --- Keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}])
def test_missing_or_wrong_key_is_refused_with_401(server, headers):
    answer = requests.post(
        server.url + "/api/v1/temperature_reading",
        json={"sensor_id": "k", "temperature": 1},
        headers=headers,
        timeout=5,
    )

    assert answer.status_code == 401
    assert "X-API-Key" in answer.json()["detail"]
    assert stored_count(server) == 0


def test_every_key_in_the_list_works_for_rotation(make_server):
    server = make_server(API_KEY="old-key-111, new-key-222")

    old = post_reading(server, {"sensor_id": "rot", "temperature": 1}, key="old-key-111")
    new = post_reading(server, {"sensor_id": "rot", "temperature": 2}, key="new-key-222")
    part = post_reading(server, {"sensor_id": "rot", "temperature": 3}, key="old-key")

    assert (old.status_code, new.status_code, part.status_code) == (201, 201, 401)


def test_without_a_key_setting_a_key_is_generated_saved_and_reused(make_server, tmp_path):
    server = make_server(API_KEY="", API_KEY_WS="")
    key_file = server.db_path.with_name("sensorflow.db.key")
    key = key_file.read_text().strip()

    open_attempt = post_reading(server, {"sensor_id": "g", "temperature": 1}, key="")
    with_key = post_reading(server, {"sensor_id": "g", "temperature": 1}, key=key)
    server.stop()
    again = make_server(API_KEY="", API_KEY_WS="")

    assert re.fullmatch(r"[0-9a-f]{48}", key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert open_attempt.status_code == 401 and with_key.status_code == 201
    assert post_reading(again, {"sensor_id": "g", "temperature": 2}, key=key).status_code == 201
    assert server.log().count(key) == 1  # printed once, on the first start only


def test_key_never_appears_in_the_log(make_server):
    server = make_server(LOG_LEVEL="DEBUG")

    post_reading(server, {"sensor_id": "log-1", "temperature": 20})
    post_reading(server, {"sensor_id": "log-1", "temperature": 20}, key="wrong-key-xyz")
    with subscribe(server):
        pass
    with subscribe(server, key="wrong-ws-key-xyz"):
        pass
    with subscribe(server, key=None, additional_headers={"X-API-Key": WS_KEY}):
        pass
    with ws_connect(f"{server.ws_url}/ws/sensor_updates?api%2Dkey={WS_KEY}", open_timeout=5):
        pass
    with subscribe(server, key=None, additional_headers={"Authorization": f"Bearer {WS_KEY}"}):
        pass
    wrong_name = f"{server.ws_url}/ws/sensor_updates?api_key={WS_KEY}"
    with pytest.raises(ConnectionClosed), ws_connect(wrong_name, open_timeout=5) as live:
        live.recv(timeout=5)
    server.stop()

    text = server.log()
    assert text.rstrip().endswith(f"Finished server process [{server.process.pid}]")
    assert "WebSocket /ws/sensor_updates?api-key=[hidden]" in text
    assert "api%2Dkey=[hidden]" in text
    assert WS_KEY not in text and "wrong-ws-key-xyz" not in text
    assert "POST /api/v1/temperature_reading 201" in text
    assert "sensor=log-1" in text and "client=127.0.0.1" in text
    assert API_KEY not in text and "wrong-key-xyz" not in text


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"temperature": 20}', "sensor_id"),
        (b'{"sensor_id": "", "temperature": 20}', "sensor_id"),
        (b'{"sensor_id": "a b", "temperature": 20}', "sensor_id"),
        (b'{"sensor_id": "' + b"x" * 65 + b'", "temperature": 20}', "sensor_id"),
        (b'{"sensor_id": 42, "temperature": 20}', "sensor_id"),
        (b'{"sensor_id": "s1"}', "reading"),
        (b'{"sensor_id": "s1", "rssi": -40}', "reading"),
        (b'{"sensor_id": "s1", "temperature": NaN}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": Infinity}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": -Infinity}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": 1e999}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": null}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": true}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": {"v": 1}}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": [20]}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": "nan"}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": "20C"}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": "0x14"}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": "1_000"}', "temperature"),
        ('{"sensor_id": "s1", "temperature": "\u0661\u0662"}'.encode(), "temperature"),
        (b'{"sensor_id": "..", "temperature": 20}', "sensor_id"),
        (b'{"sensor_id": "s1", "temperature": ""}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": -999}', "temperature"),
        (b'{"sensor_id": "s1", "temperature": 1500.1}', "temperature"),
        (b'{"sensor_id": "s1", "humidity": 100.5}', "humidity"),
        (b'{"sensor_id": "s1", "humidity": -1}', "humidity"),
        (b'{"sensor_id": "s1", "pressure": 0}', "pressure"),
        (b'{"sensor_id": "s1", "pressure": 20001}', "pressure"),
        (b'{"sensor_id": "s1", "temperature": 20, "humidity": "wet"}', "humidity"),
        (b'{"sensor_id": "s1", "temperature": 20, "timestamp": "yesterday"}', "timestamp"),
        (
            b'{"sensor_id": "s1", "temperature": 20, "timestamp": "2026-01-01T10:00:00"}',
            "timestamp",
        ),
        (b'{"sensor_id": "s1", "temperature": 20, "timestamp": true}', "timestamp"),
    ],
)
def test_invalid_reading_is_refused_with_422_naming_the_field(server, body, field):
    post_reading(server, {"sensor_id": "keep", "temperature": 20})

    answer = server.post("/api/v1/temperature_reading", data=body,
                         headers={"Content-Type": "application/json"})  # fmt: skip

    assert answer.status_code == 422
    assert answer.json()["detail"]["field"] == field
    assert field in answer.json()["error"] or field == "reading"
    assert len(answer.content) < 300
    assert stored_count(server) == 1


@pytest.mark.parametrize("body", [b"{not json", b'{"sensor_id": "a",', b"\xff\xfe", b"[1, 2]",
                                  b'"text"', b"42", b""])  # fmt: skip
def test_malformed_json_or_non_object_is_refused_with_400(server, body):
    answer = server.post("/api/v1/temperature_reading", data=body,
                         headers={"Content-Type": "application/json"})  # fmt: skip

    assert answer.status_code == 400
    assert answer.json()["error"]
    assert stored_count(server) == 0


def test_body_over_the_limit_is_refused_with_413_before_it_is_read(make_server):
    server = make_server(MAX_BODY_BYTES="1000")
    head = (
        b"POST /api/v1/temperature_reading HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n"
    )

    answer = raw_request(server, head + b'{"sensor_id": "big", "temperature": 1')

    assert answer.startswith(b"HTTP/1.1 413 ")
    assert stored_count(server) == 0


def test_chunked_body_over_the_limit_is_refused_with_413(make_server):
    server = make_server(MAX_BODY_BYTES="1000")

    def chunks():
        yield b'{"sensor_id": "big", "pad": "'
        for _ in range(100):
            yield b"x" * 100

    answer = server.post("/api/v1/temperature_reading", data=chunks(),
                         headers={"Content-Type": "application/json"})  # fmt: skip

    assert answer.status_code == 413


def test_sql_in_a_sensor_id_is_just_an_unknown_sensor(server):
    post_reading(server, {"sensor_id": "safe", "temperature": 20})

    latest = server.get("/api/v1/sensor/x' OR '1'='1/latest")
    dropped = server.get("/api/v1/sensor/x'; DROP TABLE readings; --/readings")

    assert latest.status_code == 404 and latest.json()["error"] == "unknown sensor"
    assert dropped.status_code == 200 and dropped.json()["readings"] == []
    assert stored_count(server) == 1


def test_unknown_sensor_latest_is_404(server):
    answer = server.get("/api/v1/sensor/nobody/latest")

    assert answer.status_code == 404


# --- Settings -------------------------------------------------------------------------------


def test_short_api_key_gets_a_warning_that_does_not_show_it(make_server):
    server = make_server(API_KEY="abc123", LOG_LEVEL="INFO")
    server.stop()

    assert "WARNING sensorflow: an API key is shorter than 16 characters" in server.log()
    assert "abc123" not in server.log()


def test_fields_and_ranges_are_settings(make_server):
    server = make_server(FIELDS="temperature,co2", FIELD_RANGES="co2:0:5000")

    stored = post_reading(server, {"sensor_id": "co2-1", "co2": "412.5", "humidity": 40})
    too_high = post_reading(server, {"sensor_id": "co2-1", "co2": 6000})

    assert stored.status_code == 201
    assert stored.json()["co2"] == 412.5 and "humidity" not in stored.json()
    assert too_high.status_code == 422 and too_high.json()["detail"]["field"] == "co2"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FIELDS", "temperature,Bad Name"),
        ("FIELDS", "temperature,id"),
        ("FIELD_RANGES", "co2:0:5000"),
        ("FIELD_RANGES", "temperature:50:10"),
        ("PORT", "70000"),
        ("LOG_LEVEL", "verbose"),
        ("TIMEZONE", "Mars/Olympus"),
        ("RATE_LIMIT", "lots"),
        ("METRICS_PUBLIC", "maybe"),
        ("INFLUX_HOST", "localhost:8181"),
        ("FORWARDED_ALLOW_IPS", "not-an-address"),
        ("API_KEY", " , "),
    ],
)
def test_bad_setting_stops_the_server_with_a_clear_message(tmp_path, name, value):
    server = Server(tmp_path, **{name: value})

    try:
        with pytest.raises(RuntimeError) as failure:
            server.start(timeout=10)
    finally:
        server.stop()  # (were it to start after all)

    assert f"SensorFlow cannot start: {name}" in str(failure.value)
    assert "Traceback" not in str(failure.value)


# --- Timestamps and durability ---------------------------------------------------------------


def test_two_readings_of_one_sensor_never_share_a_timestamp(server):
    def send(index):
        return post_reading(server, {"sensor_id": "fast", "temperature": index % 50}).json()

    with ThreadPoolExecutor(16) as pool:
        readings = list(pool.map(send, range(200)))

    stamps = [reading["timestamp"] for reading in readings]
    assert len(set(stamps)) == 200


def test_concurrent_requests_share_commits(server):
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(
                lambda i: post_reading(server, {"sensor_id": f"c{i % 8}", "temperature": 20}),
                range(400),
            )
        )

    commits = server.get("/api/v1/health").json()["store"]["commits"]
    assert all(answer.status_code == 201 for answer in answers)
    assert stored_count(server) == 400
    assert commits < 400


def test_acknowledged_readings_survive_sigkill(make_server):
    server = make_server()
    acknowledged = []
    lock = threading.Lock()

    def client(number):
        session = requests.Session()
        for index in range(50):
            reading = {"sensor_id": f"board-{number}", "temperature": index}
            answer = session.post(server.url + "/api/v1/temperature_reading", json=reading,
                                  headers={"X-API-Key": API_KEY}, timeout=10)  # fmt: skip
            if answer.status_code == 201:
                with lock:
                    acknowledged.append(answer.json()["id"])

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(client, range(20)))
    server.kill()
    again = make_server()

    ids = set()
    for number in range(20):
        history = again.get(f"/api/v1/sensor/board-{number}/readings").json()["readings"]
        ids.update(reading["id"] for reading in history)
    assert len(acknowledged) == 1000
    assert set(acknowledged) <= ids


# --- Health ---------------------------------------------------------------------------------


def test_ping_and_health_need_no_key_and_reveal_no_secret(server):
    ping = requests.get(server.url + "/api/v1/ping", timeout=5)
    health = requests.get(server.url + "/api/v1/health", timeout=5)

    assert ping.json() == {"status": "ok"}
    body = health.json()
    assert health.status_code == 200 and body["status"] == "healthy"
    assert {"version", "timestamp", "uptime_seconds", "store", "subscribers"} <= set(body)
    assert body["store"]["writable"] is True
    assert API_KEY not in health.text and str(server.folder) not in health.text


# --- Live updates ---------------------------------------------------------------------------


def subscribe(server: Server, query: str = "", key: str | None = WS_KEY, **kwargs):
    url = f"{server.ws_url}/ws/sensor_updates"
    if key is not None:
        url += f"?api-key={key}" + (f"&{query}" if query else "")
    return ws_connect(url, open_timeout=5, close_timeout=2, **kwargs)


def test_subscriber_gets_each_stored_reading_as_json(server):
    with subscribe(server) as live:
        stored = post_reading(server, {"sensor_id": "ws-1", "temperature": 21}).json()
        message = json.loads(live.recv(timeout=5))

    assert message == stored


def test_websocket_key_may_come_in_a_header(server):
    url = f"{server.ws_url}/ws/sensor_updates"
    with ws_connect(url, additional_headers={"X-API-Key": WS_KEY}, open_timeout=5) as live:
        post_reading(server, {"sensor_id": "ws-h", "temperature": 21})
        assert json.loads(live.recv(timeout=5))["sensor_id"] == "ws-h"


@pytest.mark.parametrize("key", [None, "wrong", API_KEY])
def test_websocket_with_missing_or_wrong_key_is_closed_with_policy_violation(server, key):
    with subscribe(server, key=key) as live:
        with pytest.raises(ConnectionClosed) as closed:
            live.recv(timeout=5)

    assert closed.value.rcvd.code == 1008
    assert "key" in closed.value.rcvd.reason


def test_a_sensor_id_filter_that_could_never_match_is_refused(server):
    with subscribe(server, query="sensor_id=bad%20id") as live:
        with pytest.raises(ConnectionClosed) as closed:
            live.recv(timeout=5)

    assert closed.value.rcvd.code == 1008
    assert "sensor_id must be" in closed.value.rcvd.reason


def test_sensor_id_parameter_limits_the_stream(server):
    with subscribe(server, "sensor_id=only-me") as live:
        post_reading(server, {"sensor_id": "other", "temperature": 1})
        post_reading(server, {"sensor_id": "only-me", "temperature": 2})
        message = json.loads(live.recv(timeout=5))

    assert message["sensor_id"] == "only-me"


def test_subscriber_that_sends_messages_keeps_its_stream(server):
    with subscribe(server) as live:
        live.send("hello")
        live.send(b"\x00\x01")
        post_reading(server, {"sensor_id": "chatty", "temperature": 3})
        message = json.loads(live.recv(timeout=5))
    server.stop()

    assert message["sensor_id"] == "chatty"
    assert "Exception" not in server.log()


def test_live_stream_is_not_compressed_so_a_browser_connection_stays_small(server):
    with ws_connect(
        f"{server.ws_url}/ws/sensor_updates?api-key={WS_KEY}", compression="deflate"
    ) as live:
        extensions = live.response.headers.get("Sec-WebSocket-Extensions")

    assert extensions is None


def test_subscriber_sending_a_large_message_is_cut_off(server):
    with subscribe(server) as live:
        live.send("x" * 10_000)
        with pytest.raises(ConnectionClosed) as closed:
            live.recv(timeout=5)

    assert closed.value.rcvd.code == 1009


def test_websocket_on_another_path_is_refused(server):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{server.ws_url}/ws/elsewhere?api-key={WS_KEY}", open_timeout=5)

    assert refused.value.response.status_code == 403


def test_websocket_rate_limit_counts_the_forwarded_address_behind_a_trusted_proxy(make_server):
    server = make_server(RATE_LIMIT="1/minute", FORWARDED_ALLOW_IPS="127.0.0.1")

    def close_code(address: str) -> int | None:
        with subscribe(server, additional_headers={"X-Forwarded-For": address}) as live:
            try:
                live.recv(timeout=0.5)
            except TimeoutError:
                return None  # still open
            except ConnectionClosed as closed:
                return closed.rcvd.code

    codes = [close_code(address) for address in ("198.51.100.1", "198.51.100.2", "198.51.100.1")]

    assert codes == [None, None, 1013]


def test_connections_past_the_per_key_limit_are_refused_and_slots_free_on_close(make_server):
    server = make_server(MAX_WS_CONNECTIONS_PER_KEY="2")

    with subscribe(server) as first, subscribe(server):
        with subscribe(server) as third:
            with pytest.raises(ConnectionClosed) as refused:
                third.recv(timeout=5)
        first.close()
        time.sleep(0.3)
        with subscribe(server) as fourth:
            post_reading(server, {"sensor_id": "slot", "temperature": 1})
            received = json.loads(fourth.recv(timeout=5))

    assert refused.value.rcvd.code == 1008
    assert "at most 2" in refused.value.rcvd.reason
    assert received["sensor_id"] == "slot"


def stalled_subscriber(server: Server) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    nonce = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /ws/sensor_updates?api-key=" + WS_KEY.encode() + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + nonce + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def test_stalled_subscriber_is_dropped_and_others_get_everything_in_order(make_server):
    server = make_server(WS_QUEUE_SIZE="100")
    stalled = stalled_subscriber(server)
    received: list[list[int]] = [[], []]

    def listen(index):
        with subscribe(server, max_queue=None) as live:
            ready.release()
            while len(received[index]) < 10_000:
                received[index].append(json.loads(live.recv(timeout=30))["id"])

    ready = threading.Semaphore(0)
    listeners = [threading.Thread(target=listen, args=(index,)) for index in range(2)]
    for thread in listeners:
        thread.start()
    for _ in listeners:
        ready.acquire(timeout=10)

    def send(number):
        session, ids = requests.Session(), []
        for index in range(2500):
            answer = session.post(server.url + "/api/v1/temperature_reading",
                                  json={"sensor_id": f"flood-{number}", "temperature": index % 90},
                                  headers={"X-API-Key": API_KEY}, timeout=10)  # fmt: skip
            ids.append(answer.json()["id"])
        return ids

    with ThreadPoolExecutor(4) as pool:
        posted = [i for ids in pool.map(send, range(4)) for i in ids]
    for thread in listeners:
        thread.join(timeout=60)
    health = server.get("/api/v1/health").json()

    assert len(posted) == 10_000
    for ids in received:
        assert ids == sorted(posted)
    assert health["subscribers"] == 0
    assert "dropped a subscriber" in server.log()
    assert connection_ends(stalled, within=15)


def connection_ends(sock: socket.socket, within: float) -> bool:
    """Read (and discard) until the server closes or resets the connection."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


# --- Batches, device time, retries ------------------------------------------------------------


def device_batch(count: int, sensor: str = "batch-1", start_ms: int | None = None) -> list:
    start_ms = start_ms or ms_ago(3_600_000)
    return [{"sensor_id": sensor, "temperature": 20 + index % 10, "humidity": "50.5",
             "timestamp": start_ms + index * 1000} for index in range(count)]  # fmt: skip


def test_batch_sent_twice_is_stored_once_and_streamed_once(server):
    batch = device_batch(1000)
    messages = []

    with subscribe(server, max_queue=None) as live:
        first = server.post("/api/v1/readings", json=batch)
        second = server.post("/api/v1/readings", json={"readings": batch})
        post_reading(server, {"sensor_id": "marker", "temperature": 1})
        while not messages or messages[-1]["sensor_id"] != "marker":
            messages.append(json.loads(live.recv(timeout=10)))

    assert first.status_code == 201
    assert first.json() == {"stored": 1000, "duplicates": 0, "clock": {"device": 1000, "server": 0}}
    assert second.status_code == 200
    assert second.json()["stored"] == 0 and second.json()["duplicates"] == 1000
    assert stored_count(server) == 1001
    batch_messages = [m for m in messages if m["sensor_id"] == "batch-1"]
    assert len(batch_messages) == 1000
    assert [m["temperature"] for m in batch_messages] == [float(r["temperature"]) for r in batch]


def test_batch_overlapping_a_stored_batch_stores_only_the_readings_not_yet_stored(server):
    batch = device_batch(1000)
    server.post("/api/v1/readings", json=batch[300:700])

    answer = server.post("/api/v1/readings", json=batch)
    history = server.get("/api/v1/sensor/batch-1/readings").json()["readings"]

    assert answer.status_code == 201
    assert answer.json()["stored"] == 600 and answer.json()["duplicates"] == 400
    assert stored_count(server) == 1000
    assert [r["temperature"] for r in history] == [float(r["temperature"]) for r in batch]
    assert len({r["id"] for r in history}) == 1000


def test_batch_with_one_bad_reading_stores_nothing_and_names_its_index(server):
    batch = device_batch(20)
    batch[7]["humidity"] = "NaN"

    answer = server.post("/api/v1/readings", json=batch)

    assert answer.status_code == 422
    assert answer.json()["detail"] == [
        {"index": 7, "field": "humidity", "message": answer.json()["detail"][0]["message"]}
    ]
    assert "humidity" in answer.json()["detail"][0]["message"]
    assert stored_count(server) == 0


@pytest.mark.parametrize("bad", ["21.5 C", "\u2028" * 30, "\x01" * 30])
def test_batch_of_many_bad_readings_is_answered_within_1_kb(server, bad):
    batch = [{"sensor_id": "board-7", "temperature": bad, "timestamp": bad} for _ in range(40)]
    body = json.dumps(batch).encode()
    request = (b"POST /api/v1/readings HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
               + API_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)  # fmt: skip

    answer = raw_request(server, request, read_size=4096)

    assert answer.startswith(b"HTTP/1.1 422 ")
    assert len(answer) <= 1024
    detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert detail["error"] == "40 invalid readings, none stored"
    assert detail["detail"][0]["index"] == 0


def test_number_with_thousands_of_digits_is_refused_with_400(server):
    body = b'{"sensor_id": "long", "temperature": ' + b"9" * 5000 + b"}"

    answer = server.post("/api/v1/temperature_reading", data=body)

    assert answer.status_code == 400
    assert answer.json() == {"error": "malformed JSON", "detail": "a number has too many digits"}


def test_batch_over_max_batch_is_refused_with_413(make_server):
    server = make_server(MAX_BATCH="10")

    answer = server.post("/api/v1/readings", json=device_batch(11))

    assert answer.status_code == 413
    assert stored_count(server) == 0


@pytest.mark.parametrize("body", [{"sensor_id": "x"}, {"readings": "x"}, "text"])
def test_batch_that_is_not_a_list_is_refused_with_400(server, body):
    answer = server.post("/api/v1/readings", json=body)

    assert answer.status_code == 400


def test_boot_time_timestamps_fall_back_to_server_time_in_order(server):
    batch = [{"sensor_id": "boot", "temperature": index, "timestamp": 12345 + index}
             for index in range(50)]  # fmt: skip
    before = ms_ago(0)

    answer = server.post("/api/v1/readings", json=batch)
    single = post_reading(server, {"sensor_id": "boot", "temperature": 99, "timestamp": 12345})

    assert answer.json()["clock"] == {"device": 0, "server": 50}
    assert single.status_code == 201 and single.json()["clock"] == "server"
    history = server.get("/api/v1/sensor/boot/readings").json()["readings"]
    assert [r["temperature"] for r in history] == [float(i) for i in range(50)] + [99.0]
    stamps = [r["timestamp"] for r in history]
    assert len(set(stamps)) == 51 and stamps == sorted(stamps)
    first = datetime.strptime(stamps[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(first.timestamp() * 1000 - before) < 60_000


@pytest.mark.parametrize("offset_ms", [10 * 60 * 1000, 400 * 24 * 3600 * 1000])
def test_future_timestamp_uses_the_server_clock(server, offset_ms):
    answer = post_reading(server, {"sensor_id": "fut", "temperature": 1,
                                   "timestamp": ms_ago(-offset_ms)})  # fmt: skip

    assert answer.json()["clock"] == "server"


@pytest.mark.parametrize(
    "stamp",
    ["2026-11-30T12:00:00.250Z", "2026-11-30T13:00:00.250+01:00", 1796040000.25, 1796040000250],
)
def test_device_time_in_each_form_is_kept(server, stamp):
    if isinstance(stamp, (int, float)) and stamp / (1000 if stamp > 1e11 else 1) > time.time():
        pytest.skip("the fixed moment is in the future on this machine's clock")
    answer = post_reading(server, {"sensor_id": "dev", "temperature": 1, "timestamp": stamp})

    assert answer.json()["clock"] == "device"
    expected = {"2026-11-30T12:00:00.250Z", "2026-12-01T17:20:00.250Z"}
    assert answer.json()["timestamp"] in expected


def test_resent_reading_answers_200_with_the_stored_reading(server):
    reading = {"sensor_id": "retry", "temperature": 21.5, "timestamp": ms_ago(5000)}

    first = post_reading(server, reading)
    again = post_reading(server, {**reading, "temperature": 99})

    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert stored_count(server) == 1


# --- History, CSV, buckets, sensors -----------------------------------------------------------


@pytest.fixture(scope="module")
def big_server(tmp_path_factory):
    """A server holding 100,000 readings of one sensor, one every 2 s over the last 55 h."""
    server = Server(tmp_path_factory.mktemp("big")).start()
    start_ms = ms_ago(100_000 * 2000 + 60_000)
    session = requests.Session()
    for offset in range(0, 100_000, 1000):
        batch = [{"sensor_id": "big", "temperature": round(15 + (i % 977) / 100, 2),
                  "humidity": (i * 7) % 100, "timestamp": start_ms + i * 2000}
                 for i in range(offset, offset + 1000)]  # fmt: skip
        answer = session.post(server.url + "/api/v1/readings", json=batch,
                              headers={"X-API-Key": API_KEY}, timeout=30)  # fmt: skip
        assert answer.status_code == 201
    server.start_ms = start_ms
    yield server
    server.stop()


def test_history_csv_of_100000_readings_streams_in_bounded_memory(big_server):
    samples, done = [], threading.Event()
    idle = rss_kib(big_server.process.pid)

    def sample():
        while not done.is_set():
            samples.append(rss_kib(big_server.process.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answer = big_server.get("/api/v1/sensor/big/readings",
                            params={"start": big_server.start_ms / 1000, "limit": 100000},
                            headers={"Accept": "text/csv"})  # fmt: skip
    done.set()
    sampler.join()

    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert answer.headers["content-type"].startswith("text/csv")
    assert 'filename="big_readings.csv"' in answer.headers["content-disposition"]
    assert list(rows[0]) == [
        "id", "sensor_id", "timestamp", "temperature", "humidity", "pressure",
        "date_recorded", "time_recorded", "clock", "client_ip",
    ]  # fmt: skip
    assert len(rows) == 100_000
    assert max(samples) - idle < 50 * 1024


def test_stalled_export_does_not_keep_the_write_ahead_log_growing(big_server):
    wal = big_server.db_path.with_name(big_server.db_path.name + "-wal")
    export = socket.socket()
    export.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a board-sized window
    export.connect(("127.0.0.1", big_server.port))
    export.sendall(
        f"GET /api/v1/sensor/big/readings?format=csv&limit=100000&start={big_server.start_ms}"
        f" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\n\r\n".encode()
    )
    export.recv(1024)  # then the client stops reading

    for batch in range(100):  # about 12 MB of write-ahead log if it could not be reused
        readings = [{"sensor_id": "busy", "temperature": 20, "timestamp": big_server.start_ms
                     + batch * 1000 + i} for i in range(1000)]  # fmt: skip
        assert big_server.post("/api/v1/readings", json=readings).status_code == 201
    wal_bytes = wal.stat().st_size
    export.close()

    assert wal_bytes < 6 * 1024 * 1024  # reused after each checkpoint of about 4 MB


def test_client_closing_a_pipelined_export_midway_leaves_no_error(big_server):
    export = (f"GET /api/v1/sensor/big/readings?format=csv&limit=100000&start="
              f"{big_server.start_ms} HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n\r\n"
              "GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip

    with socket.create_connection(("127.0.0.1", big_server.port), timeout=10) as sock:
        sock.sendall(export.encode())
        received = b""
        while len(received) < 10_000:
            received += sock.recv(4096)
    time.sleep(1)

    assert received.startswith(b"HTTP/1.1 200 ")
    assert "Exception in ASGI application" not in big_server.log()


def test_history_json_matches_the_csv(big_server):
    params = {"start": big_server.start_ms / 1000, "limit": 100000, "order": "desc"}

    as_json = big_server.get("/api/v1/sensor/big/readings", params=params).json()
    as_csv = big_server.get("/api/v1/sensor/big/readings", params={**params, "format": "csv"})

    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert as_json["count"] == len(rows) == 100_000
    for reading, row in zip(as_json["readings"], rows, strict=True):
        assert str(reading["id"]) == row["id"] and reading["timestamp"] == row["timestamp"]
        assert reading["temperature"] == float(row["temperature"])
        assert reading["humidity"] == float(row["humidity"]) and row["pressure"] == ""
    stamps = [reading["timestamp"] for reading in as_json["readings"]]
    assert stamps == sorted(stamps, reverse=True)


def test_hourly_buckets_match_the_raw_rows(big_server):
    params = {"start": big_server.start_ms / 1000, "limit": 100000}
    raw = big_server.get("/api/v1/sensor/big/readings", params=params).json()["readings"]

    buckets = big_server.get("/api/v1/sensor/big/readings", params={**params, "every": "1h"})

    expected: dict[str, list[float]] = {}
    for reading in raw:
        hour = reading["timestamp"][:13] + ":00:00.000Z"
        expected.setdefault(hour, []).append(reading["temperature"])
    got = buckets.json()["buckets"]
    assert [bucket["time"] for bucket in got] == sorted(expected)
    for bucket in got:
        values = expected[bucket["time"]]
        assert bucket["count"] == len(values)
        assert bucket["temperature_min"] == min(values)
        assert bucket["temperature_max"] == max(values)
        assert bucket["temperature_mean"] == pytest.approx(sum(values) / len(values))


def test_history_defaults_to_the_last_24_hours_and_1000_rows(big_server):
    answer = big_server.get("/api/v1/sensor/big/readings").json()

    assert answer["count"] == 1000
    first = datetime.strptime(answer["readings"][0]["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    age = datetime.now(UTC).replace(tzinfo=None) - first
    assert (
        timedelta(hours=23, minutes=58) < age <= timedelta(hours=24, seconds=5)
    )  # + the answer's way


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"start": "last week"}, "start"),
        ({"end": "2026-13-45T00:00:00Z"}, "end"),
        ({"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}, "start"),
        ({"limit": "0"}, "limit"),
        ({"limit": "100001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"every": "5 minutes"}, "every"),
        ({"every": "0m"}, "every"),
        ({"format": "xml"}, "format"),
        ({"order": "random"}, "order"),
        ({"start": "0001-01-01T00:00:00+14:00"}, "start"),
        ({"limit": "\u00b2"}, "limit"),
    ],
)
def test_bad_history_parameter_is_refused_with_422_naming_it(server, params, name):
    answer = server.get("/api/v1/sensor/any/readings", params=params)

    assert answer.status_code == 422
    assert answer.json()["detail"]["parameter"] == name
    assert name in answer.json()["error"]


def test_empty_range_is_an_empty_list_or_a_header_only_csv(server):
    post_reading(server, {"sensor_id": "lonely", "temperature": 1})
    params = {"start": "2021-01-01T00:00:00Z", "end": "2021-01-02T00:00:00Z"}

    as_json = server.get("/api/v1/sensor/lonely/readings", params=params)
    as_csv = server.get("/api/v1/sensor/nobody/readings", params={"format": "csv"})

    assert as_json.status_code == 200 and as_json.json()["readings"] == []
    assert as_csv.status_code == 200 and as_csv.text.count("\n") == 1


def test_sensors_lists_each_sensor_and_marks_silent_exactly_past_silent_after(server):
    server.post("/api/v1/readings", json=[
        {"sensor_id": "quiet", "temperature": 1, "timestamp": ms_ago(100_000)},
        {"sensor_id": "quiet", "humidity": 50, "timestamp": ms_ago(65_000)},
        {"sensor_id": "chatty", "temperature": 2, "timestamp": ms_ago(55_000)},
    ])  # fmt: skip

    listed = server.get("/api/v1/sensors", params={"silent_after": 60}).json()["sensors"]
    default = server.get("/api/v1/sensors").json()["sensors"]

    by_id = {sensor["sensor_id"]: sensor for sensor in listed}
    assert by_id["quiet"]["silent"] is True and by_id["chatty"]["silent"] is False
    assert by_id["quiet"]["count"] == 2 and by_id["quiet"]["fields"] == ["humidity", "temperature"]
    assert by_id["quiet"]["first_seen"] < by_id["quiet"]["last_seen"]
    assert by_id["quiet"]["latest"]["humidity"] == 50.0
    assert not any(sensor["silent"] for sensor in default)


# --- Abuse limits -----------------------------------------------------------------------------


def post_as(server: Server, address: str, key: str = API_KEY, sensor: str = "rl"):
    return server.post("/api/v1/temperature_reading", key=key,
                       json={"sensor_id": sensor, "temperature": 20},
                       headers={"X-Forwarded-For": address})  # fmt: skip


def test_rate_limit_answers_429_with_retry_after_and_spares_other_clients(make_server):
    server = make_server(RATE_LIMIT="5/minute", FORWARDED_ALLOW_IPS="127.0.0.1",
                         API_KEY=f"key-a-123456,key-b-123456,{API_KEY}")  # fmt: skip

    first_five = [post_as(server, "198.51.100.1", "key-a-123456") for _ in range(5)]
    limited = post_as(server, "198.51.100.1", "key-a-123456")
    other = post_as(server, "198.51.100.2", "key-b-123456")

    assert [answer.status_code for answer in first_five] == [201] * 5
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 12
    assert other.status_code == 201
    assert stored_count(server) == 6


def test_rate_limit_applies_per_key_across_addresses(make_server):
    server = make_server(RATE_LIMIT="3/minute", FORWARDED_ALLOW_IPS="127.0.0.1")

    answers = [post_as(server, f"198.51.100.{index}") for index in range(1, 6)]

    assert [answer.status_code for answer in answers] == [201, 201, 201, 429, 429]


def test_forwarded_for_from_an_untrusted_peer_is_ignored_everywhere(make_server):
    server = make_server(RATE_LIMIT="3/minute", API_KEY="key-a-123456,key-b-123456,key-c-123456",
                         LOG_LEVEL="INFO")  # fmt: skip

    answers = [post_as(server, f"203.0.113.{i}", f"key-{'abc'[i]}-123456") for i in range(3)]
    limited = post_as(server, "203.0.113.99", "key-a-123456")
    server.stop()

    assert answers[0].json()["client_ip"] == "127.0.0.1"
    assert limited.status_code == 429  # the same address, whatever the header says
    assert "203.0.113" not in server.log()


def test_behind_a_trusted_proxy_the_rightmost_untrusted_hop_is_the_client(make_server):
    server = make_server(FORWARDED_ALLOW_IPS="127.0.0.1, 10.0.0.0/8", LOG_LEVEL="INFO")

    answer = post_as(server, "203.0.113.9, 198.51.100.7, 10.1.2.3")
    server.stop()

    assert answer.json()["client_ip"] == "198.51.100.7"
    assert "client=198.51.100.7" in server.log()


def test_reading_waits_for_another_program_holding_the_write_lock_without_stalling_others(server):
    post_reading(server, {"sensor_id": "first", "temperature": 1})
    other = sqlite3.connect(server.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post_reading, server, {"sensor_id": "patient", "temperature": 2})
        time.sleep(0.5)
        started = time.monotonic()
        ping = requests.get(server.url + "/api/v1/ping", timeout=10)
        ping_seconds = time.monotonic() - started
        was_waiting = not waiting.done()
        other.execute("COMMIT")
        answer = waiting.result(timeout=10)
    other.close()

    assert was_waiting
    assert ping.status_code == 200 and ping_seconds < 0.5
    assert answer.status_code == 201


def test_write_lock_held_too_long_by_another_program_gives_503_within_5_s_and_health_says_why(
    server,
):
    post_reading(server, {"sensor_id": "first", "temperature": 1})
    other = sqlite3.connect(server.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    def timed_post(sensor_id: str) -> tuple[int, float, dict]:
        started = time.monotonic()
        answer = post_reading(server, {"sensor_id": sensor_id, "temperature": 2})
        return answer.status_code, time.monotonic() - started, answer.json()

    with ThreadPoolExecutor(2) as pool:
        early = pool.submit(timed_post, "early")
        time.sleep(3)
        late = pool.submit(timed_post, "late")
        results = [early.result(timeout=20), late.result(timeout=20)]
    health = requests.get(server.url + "/api/v1/health", timeout=10)
    other.execute("COMMIT")
    time.sleep(1.5)  # no write meanwhile
    other.execute("BEGIN IMMEDIATE")  # a short hold a moment later is waited for afresh
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(post_reading, server, {"sensor_id": "again", "temperature": 4})
        time.sleep(0.5)
        other.execute("COMMIT")
        again = again.result(timeout=10)
    other.close()
    after = post_reading(server, {"sensor_id": "after", "temperature": 3})

    assert [status for status, _, _ in results] == [503, 503]
    assert again.status_code == 201
    assert results[0][1] < 6.5 and results[1][1] < 3.5  # the late one does not wait 5 s anew
    assert "write lock" in results[0][2]["detail"]
    assert health.status_code == 503 and "write lock" in health.json()["store"]["detail"]
    assert after.status_code == 201


def test_client_that_expects_100_continue_gets_it_before_sending_the_body(server):
    body = b'{"sensor_id": "careful", "temperature": 20.5}'
    head = (b"POST /api/v1/temperature_reading HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-API-Key: " + API_KEY.encode() + b"\r\nExpect: 100-continue\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        interim = sock.recv(1024)
        sock.sendall(body)
        final = sock.recv(1024)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 201 ")


def test_client_that_expects_100_continue_and_is_refused_is_told_the_connection_closes(server):
    head = (b"POST /api/v1/temperature_reading HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-API-Key: wrong-key\r\nExpect: 100-continue\r\n"
            b"Content-Length: 38\r\n\r\n")  # fmt: skip

    answer = raw_request(server, head)

    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nconnection: close\r\n" in answer.lower()


def test_head_request_on_a_kept_alive_connection_is_answered_at_once(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"HEAD /api/v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = sock.recv(1024)
        sock.sendall(b"GET /api/v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        again = sock.recv(1024)

    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")
    assert again.startswith(b"HTTP/1.1 200 ") and again.endswith(b'{"status":"ok"}')


def test_pipelined_request_waiting_behind_a_slow_answer_is_not_timed_out(make_server):
    server = make_server(REQUEST_TIMEOUT="1")
    post_reading(server, {"sensor_id": "warm", "temperature": 1})
    other = sqlite3.connect(server.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the first answer waits for this lock
    first = keep_alive_request(b'{"sensor_id": "first", "temperature": 2}')
    second = keep_alive_request(b'{"sensor_id": "second", "temperature": 3}')

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(first)
        time.sleep(0.3)
        sock.sendall(second[:-10])
        time.sleep(0.3)
        sock.sendall(second[-10:])
        time.sleep(1.5)  # past REQUEST_TIMEOUT, while the first answer still waits
        other.execute("COMMIT")
        received = b""
        while received.count(b"HTTP/1.1 201 ") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    other.close()

    assert received.count(b"HTTP/1.1 201 ") == 2, received[:300]
    assert b"408" not in received


def keep_alive_request(body: bytes) -> bytes:
    return (b"POST /api/v1/temperature_reading HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip


def test_unparseable_request_gets_a_json_400(server):
    answer = raw_request(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: W\r\n\r\n")

    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "malformed HTTP request"


def test_client_that_trickles_its_headers_is_dropped(make_server):
    server = make_server(REQUEST_TIMEOUT="1")

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/temperature_reading HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        closed = sock.recv(1024)

    assert closed == b""
    assert time.monotonic() - started < 5


def test_client_that_never_finishes_its_body_gets_408(make_server):
    server = make_server(REQUEST_TIMEOUT="1")
    head = (b"POST /api/v1/temperature_reading HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip

    answer = raw_request(server, head)

    assert answer.startswith(b"HTTP/1.1 408 ")
    assert stored_count(server) == 0


def test_500_idle_connections_do_not_stop_readings(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(500)]
    try:
        time.sleep(0.5)

        answers = [post_reading(server, {"sensor_id": "busy", "temperature": i}) for i in range(20)]

        assert [answer.status_code for answer in answers] == [201] * 20
    finally:
        for sock in idle:
            sock.close()


def test_no_cors_headers_unless_origins_are_configured(make_server, tmp_path):
    plain = make_server(folder=tmp_path / "plain")
    allowed = make_server(folder=tmp_path / "cors", CORS_ORIGINS="https://dash.example.org")
    preflight = {"Origin": "https://dash.example.org", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "x-api-key"}  # fmt: skip

    without = requests.options(plain.url + "/api/v1/sensors", headers=preflight, timeout=5)
    with_cors = requests.options(allowed.url + "/api/v1/sensors", headers=preflight, timeout=5)
    foreign = requests.options(allowed.url + "/api/v1/sensors", timeout=5,
                               headers={**preflight, "Origin": "https://evil.example"})  # fmt: skip

    assert "access-control-allow-origin" not in without.headers
    assert with_cors.headers["access-control-allow-origin"] == "https://dash.example.org"
    assert "access-control-allow-origin" not in foreign.headers


# --- Metrics ----------------------------------------------------------------------------------


def test_metrics_need_a_key_and_count_requests_readings_and_rejections(server):
    post_reading(server, {"sensor_id": "m", "temperature": 20})
    post_reading(server, {"sensor_id": "m", "temperature": "NaN"})
    with subscribe(server):
        time.sleep(0.2)
        text = server.get("/metrics").text

    closed = requests.get(server.url + "/metrics", timeout=5)

    assert closed.status_code == 401
    assert 'sensorflow_requests_total{route="/api/v1/temperature_reading",status="201"} 1.0' in text
    assert "sensorflow_readings_stored_total 1.0" in text
    assert 'sensorflow_readings_rejected_total{reason="invalid"} 1.0' in text
    assert "sensorflow_subscribers 1.0" in text
    assert "sensorflow_commit_seconds_count 1.0" in text
    assert (
        'sensorflow_request_seconds_bucket{le="0.005",route="/api/v1/temperature_reading"}' in text
    )


def test_metrics_can_be_public(make_server):
    server = make_server(METRICS_PUBLIC="true")

    answer = requests.get(server.url + "/metrics", timeout=5)

    assert answer.status_code == 200 and "sensorflow_requests_total" in answer.text


# --- Faults -----------------------------------------------------------------------------------


def test_sigkill_under_load_keeps_every_acknowledged_reading_and_no_refused_one(make_server):
    server = make_server()
    acknowledged, refused, lock = [], [], threading.Lock()
    stop = threading.Event()
    base_ms = ms_ago(200_000)

    def writer(number):
        session = requests.Session()
        for index in range(10_000):
            if stop.is_set():
                return
            bad = index % 5 == 0
            reading = {"sensor_id": f"load-{number}", "temperature": index % 90,
                       "humidity": 150 if bad else 40, "timestamp": base_ms + index}  # fmt: skip
            try:
                answer = session.post(server.url + "/api/v1/temperature_reading", json=reading,
                                      headers={"X-API-Key": API_KEY}, timeout=5)  # fmt: skip
            except requests.RequestException:
                return
            with lock:
                if answer.status_code == 201:
                    acknowledged.append((reading["sensor_id"], reading["timestamp"]))
                elif answer.status_code == 422:
                    refused.append((reading["sensor_id"], reading["timestamp"]))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < 1500:
        time.sleep(0.01)
    server.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    again = make_server()

    present = set()
    for number in range(8):
        history = again.get(f"/api/v1/sensor/load-{number}/readings",
                            params={"limit": 100000}).json()["readings"]  # fmt: skip
        for reading in history:
            stamp = datetime.strptime(reading["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
            ms = round(stamp.replace(tzinfo=UTC).timestamp() * 1000)
            present.add((reading["sensor_id"], ms))
    assert set(acknowledged) <= present
    assert not set(refused) & present
    assert refused


def test_full_disk_gives_503_loses_nothing_and_recovers_on_its_own(make_server):
    server = make_server()
    before = [post_reading(server, {"sensor_id": "disk", "temperature": i}) for i in range(20)]
    processes = server.process_ids()  # the server and its writer
    assert len(processes) == 2
    limits = resource.prlimit(processes[0], resource.RLIMIT_FSIZE)

    for pid in processes:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        during = post_reading(server, {"sensor_id": "disk", "temperature": 99})
        again = post_reading(server, {"sensor_id": "disk", "temperature": 98, "pressure": 990})
        health = requests.get(server.url + "/api/v1/health", timeout=5)
    finally:
        for pid in processes:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
    recovered_health = requests.get(server.url + "/api/v1/health", timeout=5)
    after = post_reading(server, {"sensor_id": "disk", "temperature": 21})
    history = server.get("/api/v1/sensor/disk/readings").json()["readings"]
    sensors = server.get("/api/v1/sensors").json()["sensors"]
    server.stop()  # (which writes out the log)

    assert all(answer.status_code == 201 for answer in before)
    assert during.status_code == 503 and again.status_code == 503
    assert "disk" in during.json()["detail"] and "not stored" in during.json()["error"]
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert "disk" in health.json()["store"]["detail"]
    assert recovered_health.status_code == 200 and after.status_code == 201
    assert [reading["temperature"] for reading in history] == [float(i) for i in range(20)] + [21.0]
    assert [sensor["fields"] for sensor in sensors] == [["temperature"]]  # no refused pressure
    warned = [line for line in server.log().splitlines() if "the store takes no writes" in line]
    assert len(warned) == 1 and "disk" in warned[0]  # once, not once per refused reading


def wait_for_health(server: Server, status: int, within: float = 10) -> dict:
    deadline = time.monotonic() + within
    while True:
        answer = requests.get(server.url + "/api/v1/health", timeout=10)
        if answer.status_code == status or time.monotonic() > deadline:
            return answer.json()
        time.sleep(0.2)


def test_a_stuck_writer_shows_in_health_and_clears_when_it_goes_on(server):
    _, writer_pid = server.process_ids()

    os.kill(writer_pid, signal.SIGSTOP)
    try:
        idle = wait_for_health(server, 503)  # nothing waits to be written: health finds it
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post_reading, server, {"sensor_id": "stuck", "temperature": 1})
            stuck = wait_for_health(server, 503)
            os.kill(writer_pid, signal.SIGCONT)
            answer = waiting.result(timeout=20)
    finally:
        os.kill(writer_pid, signal.SIGCONT)
    well = wait_for_health(server, 200)

    assert idle["status"] == "degraded" and "waited" in idle["store"]["detail"]
    assert stuck["status"] == "degraded" and "waited" in stuck["store"]["detail"]
    assert answer.status_code == 201
    assert well["status"] == "healthy"


def test_the_server_stops_with_a_clear_message_when_its_writer_process_dies(make_server, tmp_path):
    server = make_server()
    before = [post_reading(server, {"sensor_id": "w", "temperature": i}) for i in range(10)]
    _, writer_pid = server.process_ids()

    os.kill(writer_pid, signal.SIGSTOP)  # so that a reading is in its hands when it dies
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post_reading, server, {"sensor_id": "w", "temperature": 99})
        wait_for_health(server, 503)
        os.kill(writer_pid, signal.SIGKILL)
        answer = in_flight.result(timeout=20)
    exit_code = server.process.wait(timeout=15)
    restarted = make_server(tmp_path)
    after = post_reading(restarted, {"sensor_id": "w", "temperature": 10})

    assert all(answer.status_code == 201 for answer in before)
    assert answer.status_code == 503  # not "not stored": the writer may have stored it
    assert "resend" in answer.json()["error"]
    assert "this reading's timestamp was 20" in answer.json()["detail"]  # to resend it with
    assert exit_code != 0
    assert "writer process ended unexpectedly" in server.log()
    assert "writer process was killed by signal SIGKILL" in server.log()
    assert after.status_code == 201
    history = restarted.get("/api/v1/sensor/w/readings").json()["readings"]
    assert [reading["temperature"] for reading in history] == [float(i) for i in range(11)]


def test_a_database_file_moved_away_while_running_refuses_writes_and_loses_nothing(
    make_server, tmp_path
):
    server = make_server()
    first = post_reading(server, {"sensor_id": "m", "temperature": 1})
    moved = server.db_path.with_name("moved.db")
    server.db_path.rename(moved)  # its write-ahead log, holding the reading, stays behind

    refused = post_reading(server, {"sensor_id": "m", "temperature": 2})
    health = requests.get(server.url + "/api/v1/health", timeout=10)
    with contextlib.suppress(requests.RequestException):  # (the answer breaks off)
        server.get("/api/v1/sensor/m/readings")  # a read must not make a new, empty database
    made_anew = server.db_path.exists()
    server.kill()
    second = Server(tmp_path)
    try:
        with pytest.raises(RuntimeError) as refused_start:
            second.start(timeout=10)
    finally:
        second.stop()  # (were it to start after all)
    moved.rename(server.db_path)
    history = make_server(tmp_path).get("/api/v1/sensor/m/readings").json()["readings"]

    assert first.status_code == 201
    assert refused.status_code == 503 and "moved" in refused.json()["detail"]
    assert health.status_code == 503 and "put the file back" in health.json()["store"]["detail"]
    assert not made_anew
    assert "sensorflow.db-wal is there without sensorflow.db" in str(refused_start.value)
    assert [reading["temperature"] for reading in history] == [1.0]


def test_websocket_connects_count_against_the_address_rate_limit(make_server):
    server = make_server(RATE_LIMIT="2/minute")

    for _ in range(2):
        with subscribe(server):
            pass
    with subscribe(server) as limited:
        with pytest.raises(ConnectionClosed) as closed:
            limited.recv(timeout=5)

    assert closed.value.rcvd.code == 1013


def test_headers_past_64_kib_are_refused_with_431(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        try:
            for _ in range(40):
                sock.sendall(b"a" * 4096)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(1024)

    assert answer.startswith(b"HTTP/1.1 431 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request headers too large"


@pytest.mark.parametrize("size", [66_000, 100_000])
def test_headers_past_64_kib_in_one_piece_are_refused_with_431(server, size):
    request = b"GET /api/v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size
    big_body = pico_request(b'{"sensor_id": "x", "temperature": 1}' + b" " * size)

    answer = raw_request(server, request + b"\r\n\r\n")
    allowed = raw_request(server, big_body)

    assert answer.startswith(b"HTTP/1.1 431 ")
    assert allowed.startswith(b"HTTP/1.1 201 ")


def test_a_second_server_on_the_same_database_refuses_to_start(server):
    second = Server(server.folder)

    with pytest.raises(RuntimeError) as failure:
        second.start(timeout=10)

    assert "another SensorFlow server is using it" in str(failure.value)


def test_line_breaks_sent_by_a_client_cannot_forge_log_lines(make_server):
    server = make_server(LOG_LEVEL="INFO")

    post_reading(server, {"sensor_id": "x\n2026-12-04 INFO sensorflow: FORGED", "temperature": 1})
    requests.get(server.url + "/nothing%0AFORGED-TOO", timeout=5)
    server.stop()

    assert not any(line.startswith("2026-12-04 INFO sensorflow: FORGED")
                   for line in server.log().splitlines())  # fmt: skip
    assert "\nFORGED-TOO" not in server.log()


def test_an_abandoned_export_does_not_freeze_what_other_reads_see(big_server):
    params = {"start": big_server.start_ms / 1000, "limit": 100000, "format": "csv"}
    export = requests.get(big_server.url + "/api/v1/sensor/big/readings", params=params,
                          headers={"X-API-Key": API_KEY}, stream=True, timeout=30)  # fmt: skip
    next(export.iter_content(1024))

    stored = post_reading(big_server, {"sensor_id": "fresh", "temperature": 5})
    latest = big_server.get("/api/v1/sensor/fresh/latest")
    export.close()

    assert stored.status_code == 201
    assert latest.status_code == 200 and latest.json()["id"] == stored.json()["id"]
