"""The firmware examples and the simulator, against a real server.

Each example's requests are written out here byte for byte as its code sends them, replayed
on a raw socket, and the answer is read into a 1024-byte buffer as a board reads it.
"""

import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import API_KEY, HERE

KEY = API_KEY.encode()
READING_PATH = b"/api/v1/temperature_reading"
BATCH_PATH = b"/api/v1/readings"


def replay(port: int, request: bytes) -> int:
    """Send one request on a connection of its own; read at most 1024 bytes back; the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = bytearray()
        while len(answer) < 1024:
            chunk = sock.recv(1024 - len(answer))
            if not chunk:
                break
            answer += chunk
    status_line = bytes(answer).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    return int(status_line.split(b" ")[1])


# --- What each example sends ---------------------------------------------------------------


def esp32_request(port: int, path: bytes, body: bytes) -> bytes:
    # examples/esp32_wifi/esp32_wifi.ino, post(): HTTPClient::sendHeader() writes the request
    # line, Host with the port, User-Agent, Connection (setReuse(false)) and Accept-Encoding,
    # then the two headers post() added and the Content-Length HTTPClient::sendRequest() adds.
    head = (
        b"POST %s HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"User-Agent: ESP32HTTPClient\r\n"
        b"Connection: close\r\n"
        b"Accept-Encoding: identity;q=1,chunked;q=0.1,*;q=0\r\n"
        b"X-API-Key: %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"\r\n"
    )
    return head % (path, port, KEY, len(body)) + body


def esp32_reading(when: float, temperature: float, humidity: float) -> bytes:
    # esp32_wifi.ino, readingJson(): epoch ms from epochMs(), then String(value, 2) per field.
    body = (
        b'{"sensor_id":"esp32-01","timestamp":%d,"temperature":%.2f,"humidity":%.2f,'
        b'"pressure":%.2f}'
    )
    return body % (when * 1000, temperature, humidity, 1013.25)


def ethernet_request(port: int, path: bytes, body: bytes) -> bytes:
    # examples/ethernet_w5500/ethernet_w5500.ino, post(): printed piece by piece on the
    # EthernetClient; Host is print(SERVER_IP), without the port.
    head = (
        b"POST %s HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n"
        b"content-type: application/json\r\n"
        b"x-api-key: %s\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n"
        b"\r\n"
    )
    return head % (path, KEY, len(body)) + body


def ethernet_reading(when: float, temperature: float, humidity: float) -> bytes:
    # ethernet_w5500.ino, printReading(): whole epoch seconds, then print(value, 2) per field.
    body = b'{"sensor_id":"uno-01","timestamp":%d,"temperature":%.2f,"humidity":%.2f}'
    return body % (when, temperature, humidity)


def micropython_request(port: int, path: bytes, body: bytes) -> bytes:
    # examples/micropython/main.py, post(): urequests.post() writes the request line, Host
    # without the port, the HEADERS dict, Content-Length and Connection: close, then the body.
    # (MicroPython may walk the HEADERS dict in the other order; headers are read by name.)
    head = (
        b"POST %s HTTP/1.0\r\n"
        b"Host: 127.0.0.1\r\n"
        b"X-API-Key: %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    return head % (path, KEY, len(body)) + body


def micropython_reading(when: float, temperature: float, humidity: float) -> bytes:
    # main.py, reading_json(): epoch ms from epoch_ms(), then two decimals per field.
    body = b'{"sensor_id":"pico-01","timestamp":%d,"temperature":%.2f,"humidity":%.2f}'
    return body % (when * 1000, temperature, humidity)


EXAMPLES = {
    "esp32_wifi": (esp32_request, esp32_reading, "esp32-01"),
    "ethernet_w5500": (ethernet_request, ethernet_reading, "uno-01"),
    "micropython": (micropython_request, micropython_reading, "pico-01"),
}


# --- The examples against the server -------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_single_reading_is_stored(server, name):
    request, reading, sensor_id = EXAMPLES[name]
    body = reading(time.time(), 22.5, 41.25)

    status = replay(server.port, request(server.port, READING_PATH, body))

    assert status == 201
    latest = server.get(f"/api/v1/sensor/{sensor_id}/latest").json()
    assert (latest["temperature"], latest["humidity"], latest["clock"]) == (22.5, 41.25, "device")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_batch_is_stored_once_when_resent(server, name):
    request, reading, sensor_id = EXAMPLES[name]
    now = time.time()
    readings = [reading(now - 60 * age, 20 + age, 50 - age) for age in (3, 2, 1)]
    batch = request(server.port, BATCH_PATH, b"[" + b",".join(readings) + b"]")

    first = replay(server.port, batch)
    again = replay(server.port, batch)

    assert (first, again) == (201, 200)
    stored = server.get(f"/api/v1/sensor/{sensor_id}/readings").json()["readings"]
    assert [r["temperature"] for r in stored] == [23.0, 22.0, 21.0]
    assert {r["clock"] for r in stored} == {"device"}


# --- The simulator -------------------------------------------------------------------------


def simulate(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "simulate.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def read_tally(output: str) -> dict:
    """The simulator's final tally: {"sent good": 27, ..., "refused by status": {422: 3}}."""
    tally = {}
    names = "sent good|sent bad|stored|duplicates|refused|errors|lost"
    for name, number, rest in re.findall(rf"^  ({names}) +(\d+)(.*)$", output, re.MULTILINE):
        tally[name] = int(number)
        if name == "refused":
            statuses = re.findall(r"(\d{3}): (\d+)", rest)
            tally["refused by status"] = {int(s): int(n) for s, n in statuses}
    assert len(tally) == 8, output
    return tally


def test_simulator_bad_readings_are_refused_and_good_ones_stored(server):
    result = simulate(
        *("--url", server.url, "--key", API_KEY, "--sensors", "3", "--interval", "0.2"),
        *("--bad-fraction", "0.3", "--count", "10", "--seed", "7"),
    )

    assert result.returncode == 0, result.stderr
    assert API_KEY not in result.stdout + result.stderr
    tally = read_tally(result.stdout)
    assert tally["sent bad"] > 0
    assert tally["refused by status"] == {422: tally["sent bad"]}
    assert tally["stored"] == tally["sent good"] == 30 - tally["sent bad"]
    assert tally["duplicates"] == tally["errors"] == tally["lost"] == 0
    sensors = server.get("/api/v1/sensors").json()["sensors"]
    assert sorted(s["sensor_id"] for s in sensors) == ["sim-01", "sim-02", "sim-03"]
    assert sum(s["count"] for s in sensors) == tally["stored"]
    for sensor in sensors:
        history = server.get(f"/api/v1/sensor/{sensor['sensor_id']}/readings").json()
        for r in history["readings"]:
            assert -40 < r["temperature"] < 60 and 0 <= r["humidity"] <= 100
            assert 950 < r["pressure"] < 1080 and not math.isnan(r["temperature"])


def test_simulator_finds_the_server_and_key_in_the_env_file(server, tmp_path):
    (tmp_path / ".env").write_text(f"HOST=127.0.0.1\nPORT={server.port}\nAPI_KEY={API_KEY}\n")
    env = {"PATH": os.environ["PATH"]}

    result = simulate("--sensors", "1", "--count", "1", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert f"http://127.0.0.1:{server.port}" in result.stdout
    assert read_tally(result.stdout)["stored"] == 1


def test_simulator_buffers_readings_during_an_outage_and_the_batch_lands(server):
    # Rounds are scheduled at 0, 0.25 ... 1.75 s; the link is down for those at 1.0, 1.25, 1.5.
    result = simulate(
        *("--url", server.url, "--key", API_KEY, "--sensors", "2", "--interval", "0.25"),
        *("--offline-every", "1", "--offline-for", "0.6", "--count", "8"),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("link down") == 3
    assert "final batch" not in result.stdout  # the batch went out when the link came back
    tally = read_tally(result.stdout)
    assert tally["stored"] == tally["sent good"] == 16
    assert tally["errors"] == tally["lost"] == tally["refused"] == 0
    for sensor_id in ("sim-01", "sim-02"):
        readings = server.get(f"/api/v1/sensor/{sensor_id}/readings").json()["readings"]
        assert len(readings) == 8
        assert sum(r["clock"] == "device" for r in readings) == 3


def test_simulator_sends_what_it_buffered_when_the_run_ends_during_an_outage(server):
    result = simulate(
        *("--url", server.url, "--key", API_KEY, "--sensors", "1", "--interval", "0.25"),
        *("--offline-every", "1", "--offline-for", "0.6", "--count", "6"),
    )

    assert result.returncode == 0, result.stderr
    assert re.search(r"^final batch: stored 2 ", result.stdout, re.MULTILINE), result.stdout
    tally = read_tally(result.stdout)
    assert tally["stored"] == tally["sent good"] == 6 and tally["lost"] == 0
    assert server.get("/api/v1/sensors").json()["sensors"][0]["count"] == 6


def test_simulator_stops_on_its_own_when_the_duration_is_over(server):
    result = simulate(
        *("--url", server.url, "--key", API_KEY, "--sensors", "2", "--interval", "0.2"),
        *("--duration", "1"),
    )

    assert result.returncode == 0, result.stderr
    rounds = int(re.search(r"^tally after (\d+) rounds", result.stdout, re.MULTILINE)[1])
    assert 1 <= rounds <= 5  # rounds are due at 0, 0.2 ... 0.8 s
    tally = read_tally(result.stdout)
    assert tally["stored"] == tally["sent good"] == 2 * rounds


def test_simulator_finds_the_key_the_server_saved_beside_its_database(make_server, tmp_path):
    server = make_server(API_KEY="", API_KEY_WS="")
    key = (tmp_path / "sensorflow.db.key").read_text().strip()
    no_key_env = {"PATH": os.environ.get("PATH", "")}

    result = simulate(
        *("--url", server.url, "--sensors", "1", "--interval", "0.1", "--count", "2"),
        cwd=tmp_path,
        env=no_key_env,
    )

    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    assert read_tally(result.stdout)["stored"] == 2


def test_simulator_without_any_key_says_where_to_put_one(tmp_path):
    result = simulate("--count", "1", cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})

    assert result.returncode == 2
    assert "no API key" in result.stderr


def test_simulator_exits_with_1_when_the_key_is_refused_or_the_server_is_gone(server):
    wrong_key = simulate(*("--url", server.url, "--key", "wrong-key-0123456789", "--count", "1"))
    port = server.port
    server.stop()
    gone = simulate(*("--url", f"http://127.0.0.1:{port}", "--key", API_KEY, "--count", "1"))

    assert wrong_key.returncode == 1 and read_tally(wrong_key.stdout)["refused by status"] == {
        401: 3
    }
    assert gone.returncode == 1 and read_tally(gone.stdout)["lost"] > 0
