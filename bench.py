"""Benchmark of SensorFlow Server against the ceiling of its own stack, written to BENCHMARKS.md.

One run starts, on 127.0.0.1 with free ports and temporary folders:
    bare    a Starlette endpoint under the same uvicorn settings (uvloop, httptools, no access
            log, no server header, one worker) that only json.loads the body and answers 201;
    sqlite  our server (app.py) with its embedded SQLite store;
    influx  our server in InfluxDB mode against the test stand-in (influx_standin.py), when
            both exist; otherwise its rows say "skipped" and why.
Load comes from separate processes: wrk (with a Lua script) when installed, else an asyncio
load generator in this file. Every number is the median of --runs runs.

    python bench.py                  # the full benchmark, about 6-10 minutes on 2 cores
    python bench.py --quick          # a one-minute smoke run (1 run each, short, fewer rows)
    python bench.py --duration 10    # longer runs

Measured: single readings over keep-alive (16 and 64 connections) and with a new connection per
reading; batches of 1,000 readings; WebSocket fan-out delay; resident memory. Targets are checked
and the table is printed and written to BENCHMARKS.md. The section "Where the time goes" of an
existing BENCHMARKS.md is kept, so profiling notes survive a rerun.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import http.client
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
READING_PATH = "/api/v1/temperature_reading"
BATCH_PATH = "/api/v1/readings"
WS_PATH = "/ws/sensor_updates"
BATCH_SIZE = 1000
START_TIMEOUT_SECONDS = 30.0
WANTED_OPEN_FILES = 65536
SOCKET_SEND_BUFFER = 128 * 1024  # the same as app.py's listening socket
PACKAGES = ("starlette", "uvicorn", "uvloop", "httptools", "websockets", "influxdb3-python")
TIME_SECTION_START = "<!-- where-the-time-goes:start -->"
TIME_SECTION_END = "<!-- where-the-time-goes:end -->"
TIME_SECTION_PLACEHOLDER = (
    "_To be filled from a profile of the server under the keep-alive load (for example"
    " `py-spy record --pid PID` while `bench.py` runs). This section is kept when the"
    " benchmark is run again._"
)


# --- Processes ------------------------------------------------------------------------------

STARTED: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop one process we started, by its pid: SIGTERM, then SIGKILL after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    while STARTED:
        stop_process(STARTED.pop())


def spawn(command: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, **kwargs)
    STARTED.append(process)
    return process


def forget(process: subprocess.Popen) -> None:
    stop_process(process)
    if process in STARTED:
        STARTED.remove(process)


def children(pid: int) -> list[int]:
    """The processes pid has started (our server: its writer process)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def memory_kb(pid: int) -> int:
    """Resident memory of a process and its children, each page counted once: the process's
    resident set, plus the pages each child holds for itself (a forked child shares the rest
    with its parent). From /proc/PID/smaps_rollup."""
    total = smaps_kb(pid, "Rss")
    for child in children(pid):
        total += smaps_kb(child, "Private_Clean") + smaps_kb(child, "Private_Dirty")
    return total


def smaps_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process and its children have used so far."""
    used = 0.0
    for one in (pid, *children(pid)):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        used += (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND
    return used


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used (steal counts as busy)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS_PER_SECOND


def own_cpu() -> float:
    """CPU seconds of this process and of the children it has waited for (the loaders)."""
    used = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        used += usage.ru_utime + usage.ru_stime
    return used


def with_cpu(pid: int, run: Callable[[], dict], helpers: tuple[int, ...] = ()) -> dict:
    """Run one load and add the server's CPU use per reading and the CPU that processes
    other than the server, its `helpers` (the InfluxDB stand-in) and the load generator took
    meanwhile: another job on the machine."""
    server, machine, own, began = process_cpu(pid), machine_busy(), own_cpu(), time.monotonic()
    helped = sum(process_cpu(helper) for helper in helpers)
    result = run()
    elapsed = time.monotonic() - began
    server = process_cpu(pid) - server
    helped = sum(process_cpu(helper) for helper in helpers) - helped
    other = machine_busy() - machine - server - helped - (own_cpu() - own)
    readings = result.get("stored", result["created"]) or 1
    result["server_cores"] = server / elapsed
    result["cpu_us"] = server / readings * 1e6
    result["other_cores"] = max(0.0, other / elapsed)
    return result


def raise_open_file_limit() -> int:
    """1,000 subscribers need 1,000 sockets in the server and in the subscriber process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_OPEN_FILES)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return max(soft, wanted)


def http_json(port: int, method: str, path: str, key: str | None = None, body=None) -> tuple:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["X-API-Key"] = key
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


@dataclass
class Server:
    """One server process (bare endpoint or app.py) on its own port and folder."""

    name: str
    command: list[str]
    port: int
    folder: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    helpers: tuple[int, ...] = ()  # pids of processes the server needs (the InfluxDB stand-in)
    settle_seconds: float = 0.0  # longest wait for the InfluxDB spool to empty

    def start(self) -> Server:
        log = open(self.folder / f"{self.name}.log", "ab")
        self.process = spawn(
            self.command, env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited early:\n{self.log_tail()}")
            try:
                if http_json(self.port, "GET", "/api/v1/ping")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} server did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            forget(self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / f"{self.name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}


def this_script(*arguments: object) -> list[str]:
    """The command running this script again, in one of its helper roles."""
    return [sys.executable, str(Path(__file__).resolve()), *map(str, arguments)]


def bare_server(folder: Path) -> Server:
    port = free_port()
    command = this_script("--bare-server", port)
    return Server("bare", command, port, folder, base_env())


def our_server(name: str, folder: Path, key: str, log_level: str, **extra: str) -> Server:
    port = free_port()
    env = base_env() | {
        "HOST": LOOPBACK,
        "PORT": str(port),
        "SQLITE_PATH": str(folder / "sensorflow.db"),
        "API_KEY": key,
        "LOG_LEVEL": log_level,
        # The fan-out runs open 1,000 subscribers with one key.
        "MAX_WS_CONNECTIONS_PER_KEY": "5000",
    }
    env.update(extra)
    return Server(name, [sys.executable, str(HERE / "app.py")], port, folder, env)


def health(server: Server) -> dict:
    return http_json(server.port, "GET", "/api/v1/health")[1] or {}


def commits(server: Server) -> int | None:
    return health(server).get("store", {}).get("commits")


SETTLE_TIMEOUT_SECONDS = 120.0


def settle(server: Server) -> float:
    """In InfluxDB mode a reading is acknowledged once it is in the local spool and reaches
    InfluxDB just after: wait (bounded) until the spool is empty. Returns the seconds waited."""
    began = time.monotonic()
    while True:
        store = health(server).get("store", {})
        if not store.get("spool_backlog"):
            break
        if time.monotonic() - began > SETTLE_TIMEOUT_SECONDS:
            say(f"    the spool did not empty in {SETTLE_TIMEOUT_SECONDS:g} s: {store}")
            break
        time.sleep(0.1)
    waited = time.monotonic() - began
    server.settle_seconds = max(server.settle_seconds, waited)
    return waited


def stored_count(server: Server, key: str) -> int:
    """How many readings the store holds, summed over GET /api/v1/sensors."""
    status, body = http_json(server.port, "GET", "/api/v1/sensors", key)
    if status != 200:
        raise RuntimeError(f"GET /api/v1/sensors answered {status}")
    return sum(entry["count"] for entry in body["sensors"])


# --- The bare endpoint ----------------------------------------------------------------------


def run_bare_server(port: int) -> None:
    """The ceiling of our stack: parse the body, answer 201, nothing else."""
    import itertools

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    ids = itertools.count(1)

    async def reading(request: Request) -> JSONResponse:
        data = json.loads(await request.body())
        return JSONResponse({"id": next(ids), "sensor_id": data.get("sensor_id")}, 201)

    async def ping(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[Route(READING_PATH, reading, methods=["POST"]), Route("/api/v1/ping", ping)]
    )
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    sock = socket.create_server((LOOPBACK, port), backlog=2048)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
    uvicorn.Server(config).run(sockets=[sock])


# --- Load: wrk ------------------------------------------------------------------------------

# One sensor id per connection slot; the key comes from the environment, never the file.
WRK_SCRIPT = r"""
local key = os.getenv("BENCH_API_KEY")
local close = os.getenv("BENCH_CLOSE") == "1"
local slots = tonumber(os.getenv("BENCH_SLOTS"))
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  created, other, counter = 0, 0, 0
  headers = {["Content-Type"] = "application/json", ["X-API-Key"] = key}
  if close then headers["Connection"] = "close" end
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"sensor_id":"bench-%d-%d","temperature":%.2f,"humidity":%.1f,"pressure":1013.25}',
    tid, counter % slots, 20 + (counter % 100) / 10, 40 + counter % 30)
  return wrk.format("POST", "/api/v1/temperature_reading", headers, body)
end

function response(status, headers, body)
  if status == 201 then created = created + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local c, o = 0, 0
  for _, thread in ipairs(threads) do
    c = c + thread:get("created")
    o = o + thread:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"elapsed":%.6f,"p50_ms":%.3f,"p99_ms":%.3f,"created":%d,' ..
    '"other":%d,"errors":%d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, c, o, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def run_wrk(
    port: int, key: str, connections: int, duration: float, close: bool, folder: Path
) -> dict:
    script = folder / "reading.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    env = base_env() | {
        "BENCH_API_KEY": key,
        "BENCH_CLOSE": "1" if close else "0",
        "BENCH_SLOTS": str(connections),
    }
    # One wrk thread: it is efficient enough and leaves the second core to the server.
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{LOOPBACK}:{port}{READING_PATH}",
    ]
    process = spawn(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=duration + 60)
    finally:
        forget(process)
    match = re.search(r"BENCH_JSON (\{.*\})", out)
    if not match:
        raise RuntimeError(f"wrk gave no result: {out[-500:]} {err[-500:]}")
    result = json.loads(match[1])
    result["rate"] = result["created"] / result["elapsed"]
    result["drained"] = False
    return result


# --- Load: our own asyncio generator ---------------------------------------------------------


def reading_body(sensor: str, n: int) -> bytes:
    return (
        f'{{"sensor_id":"{sensor}","temperature":{20 + (n % 100) / 10:.2f},'
        f'"humidity":{40 + n % 30:.1f},"pressure":1013.25}}'
    ).encode()


def batch_body(sensor: str, first_ms: int, start: int, count: int) -> bytes:
    """`count` readings of one sensor, one second apart, as a board that buffered them sends."""
    items = [
        f'{{"sensor_id":"{sensor}","temperature":{20 + (n % 100) / 10:.2f},'
        f'"humidity":{40 + n % 30:.1f},"pressure":1013.25,"timestamp":{first_ms + n * 1000}}}'
        for n in range(start, start + count)
    ]
    return ("[" + ",".join(items) + "]").encode()


async def drive(options: argparse.Namespace) -> dict:
    """Keep `connections` requests in flight until the deadline (or the reading budget), then
    wait for every answer, so every request sent is counted."""
    key = os.environ["BENCH_API_KEY"]
    path = BATCH_PATH if options.kind == "batch" else READING_PATH
    per_request = BATCH_SIZE if options.kind == "batch" else 1
    closing = "Connection: close\r\n" if options.close else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{options.port}\r\n"
        f"Content-Type: application/json\r\nX-API-Key: {key}\r\n{closing}"
    )
    deadline = time.monotonic() + options.duration if options.duration else math.inf
    budget = options.total or math.inf
    first_ms = (time.time_ns() // 1_000_000) - 20 * 86_400_000
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    state = {"sent": 0, "stored": 0, "errors": 0}

    async def connection(index: int) -> None:
        sensor = f"{options.tag}-{index}"
        reader = writer = None
        n = 0
        while time.monotonic() < deadline and state["sent"] < budget:
            if options.kind == "batch":
                body = batch_body(sensor, first_ms, n * BATCH_SIZE, BATCH_SIZE)
            else:
                body = reading_body(sensor, n)
            n += 1
            state["sent"] += per_request
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(LOOPBACK, options.port)
                started = time.perf_counter()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                header = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", header)[1])
                answer = await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(header[9:12])
                statuses[status] += 1
                if options.kind == "batch" and status in (200, 201):
                    state["stored"] += json.loads(answer)["stored"]
                if options.close or b"connection: close" in header.lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TypeError):
                state["errors"] += 1
                if writer is not None:
                    writer.close()
                writer = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(index) for index in range(options.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    created = statuses.get(201, 0)
    stored = state["stored"] if options.kind == "batch" else created
    return {
        "requests": len(latencies),
        "elapsed": elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "created": created,
        "other": sum(statuses.values()) - created,
        "errors": state["errors"],
        "stored": stored,
        "rate": stored / elapsed,
        "drained": True,
    }


def run_loader(
    port: int,
    key: str,
    connections: int,
    duration: float,
    close: bool,
    kind: str = "single",
    total: int = 0,
    tag: str = "bench-p",
) -> dict:
    command = this_script(
        *("--load", port, "--connections", connections, "--duration", duration),
        *("--kind", kind, "--total", total, "--tag", tag),
    ) + (["--close"] if close else [])
    env = base_env() | {"BENCH_API_KEY": key}
    process = spawn(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=(duration or 600) + 120)
    finally:
        forget(process)
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed: {err[-800:]}")
    return json.loads(out.strip().splitlines()[-1])


# --- WebSocket subscribers --------------------------------------------------------------------


class Subscriber(asyncio.Protocol):
    """A minimal WebSocket client: it records (reading id, receipt time) for every message."""

    def __init__(self, request: bytes, opened: asyncio.Future, ids: list, times: list) -> None:
        self.request = request
        self.opened = opened
        self.ids = ids
        self.times = times
        self.buffer = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.upgraded = self.buffer.startswith(b"HTTP/1.1 101")
            if not self.opened.done():
                self.opened.set_result(self.upgraded)
            del self.buffer[: end + 4]
            if not self.upgraded:
                self.transport.close()
                return
        self.read_frames(now)

    def read_frames(self, now: float) -> None:
        buffer, offset = self.buffer, 0
        while len(buffer) - offset >= 2:
            opcode, length, start = buffer[offset] & 0x0F, buffer[offset + 1] & 0x7F, offset + 2
            if length == 126:
                if len(buffer) - offset < 4:
                    break
                length, start = int.from_bytes(buffer[start : start + 2], "big"), start + 2
            elif length == 127:
                if len(buffer) - offset < 10:
                    break
                length, start = int.from_bytes(buffer[start : start + 8], "big"), start + 8
            if len(buffer) < start + length:
                break
            payload = bytes(buffer[start : start + length])
            offset = start + length
            if opcode == 1:
                match = re.search(rb'"id":(\d+)', payload)
                if match:
                    self.ids.append(int(match[1]))
                    self.times.append(now)
            elif opcode == 9:
                self.transport.write(client_frame(10, payload))
            elif opcode == 8:
                self.transport.write(client_frame(8, payload[:2]))
                self.transport.close()
        del buffer[:offset]


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame must be masked (RFC 6455); the payloads here are under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def subscribe(options: argparse.Namespace) -> None:
    """Open N subscribers, say "ready", record until told "stop", then write what arrived."""
    loop = asyncio.get_running_loop()
    key = os.environ["BENCH_API_KEY"]
    ids: list[int] = []
    times: list[float] = []
    transports = []

    async def open_one() -> bool:
        nonce = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {WS_PATH}?api-key={key} HTTP/1.1\r\nHost: {LOOPBACK}:{options.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        opened = loop.create_future()
        try:
            transport, _ = await loop.create_connection(
                lambda: Subscriber(request, opened, ids, times), LOOPBACK, options.port
            )
        except OSError:
            return False
        transports.append(transport)
        try:
            return await asyncio.wait_for(opened, 30)
        except TimeoutError:
            return False

    connected = 0
    for first in range(0, options.subscribers, 100):
        count = min(100, options.subscribers - first)
        connected += sum(await asyncio.gather(*(open_one() for _ in range(count))))
    print(f"ready {connected}", flush=True)

    await loop.run_in_executor(None, sys.stdin.readline)
    Path(options.out).write_text(json.dumps({"ids": ids, "times": times}))
    for transport in transports:
        transport.close()
    print("done", flush=True)


class Subscribers:
    """The subscriber process, driven over its stdin and stdout."""

    def __init__(self, port: int, key: str, count: int, out: Path) -> None:
        command = this_script("--subscribe", port, "--subscribers", count, "--out", out)
        self.out = out
        self.process = spawn(
            command,
            env=base_env() | {"BENCH_API_KEY": key},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().split()
        if not line or line[0] != "ready":
            forget(self.process)
            raise RuntimeError("the subscriber process did not start")
        self.connected = int(line[1])

    def finish(self) -> tuple[list[int], list[float]]:
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        self.process.stdout.readline()
        forget(self.process)
        data = json.loads(self.out.read_text())
        return data["ids"], data["times"]


def post_paced(port: int, key: str, rate: float, duration: float) -> dict[int, tuple]:
    """Post single readings at a steady rate over one keep-alive connection; for each stored
    reading note when it was sent and when its 201 arrived (time.time(), shared with the
    subscriber process)."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    headers = {"Content-Type": "application/json", "X-API-Key": key}
    noted = {}
    count = int(rate * duration)
    began = time.monotonic()
    try:
        for n in range(count):
            pause = began + n / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sent = time.time()
            connection.request("POST", READING_PATH, reading_body(f"fan-{n % 10}", n), headers)
            response = connection.getresponse()
            body = response.read()
            answered = time.time()
            if response.status == 201:
                noted[json.loads(body)["id"]] = (sent, answered)
    finally:
        connection.close()
    return noted


def fan_out_run(server: Server, subscribers: Subscribers, key: str, rate: float, duration: float):
    noted = post_paced(server.port, key, rate, duration)
    time.sleep(1.0)  # the last readings reach every subscriber
    ids, times = subscribers.finish()
    from_201, from_send = [], []
    for reading_id, received in zip(ids, times, strict=True):
        if reading_id in noted:
            sent, answered = noted[reading_id]
            from_201.append(received - answered)
            from_send.append(received - sent)
    from_201.sort()
    from_send.sort()
    posts = sorted(answered - sent for sent, answered in noted.values())
    expected = len(noted) * subscribers.connected
    return {
        "subscribers": subscribers.connected,
        "readings": len(noted),
        "messages": len(from_201),
        "missing": expected - len(from_201),
        "p50_ms": percentile(from_201, 50) * 1000,
        "p99_ms": percentile(from_201, 99) * 1000,
        "p99_from_send_ms": percentile(from_send, 99) * 1000,
        "post_p50_ms": percentile(posts, 50) * 1000,
        "post_p99_ms": percentile(posts, 99) * 1000,
    }


# --- Measurements ----------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Measure:
    """Several runs of one measurement; the median is reported, the runs are kept."""

    runs: list[dict] = field(default_factory=list)
    skipped: str | None = None

    def median(self, key: str) -> float:
        values = [run[key] for run in self.runs if key in run and not math.isnan(run[key])]
        return statistics.median(values) if values else math.nan

    def values(self, key: str) -> list[float]:
        return [run[key] for run in self.runs]


@dataclass
class Bench:
    options: argparse.Namespace
    key: str
    root: Path
    loader: str
    results: dict[str, Measure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: str = ""  # of app.py when the run began

    def measure(self, name: str) -> Measure:
        return self.results.setdefault(name, Measure())

    def skip(self, name: str, reason: str) -> None:
        self.measure(name).skipped = reason

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def hit(self, server: Server, connections: int, close: bool, duration: float) -> dict:
        if self.loader == "wrk":
            return run_wrk(server.port, self.key, connections, duration, close, self.root)
        return run_loader(server.port, self.key, connections, duration, close)

    def steady(
        self,
        server: Server,
        run: Callable[[], dict],
        label: str,
        count: Callable[[], int] | None = None,
    ) -> dict:
        """One measured run; rerun (up to --retries times) when another job on the machine
        took more than --max-other-cores meanwhile, keeping the least disturbed attempt.
        With `count` (readings in the store), note what each attempt added to the store."""
        attempts = []
        for attempt in range(1 + self.options.retries):
            before = count() if count else 0
            commits_before = commits(server) if count else None
            result = with_cpu(server.pid, run, server.helpers)
            if count:
                result["stored_after"] = count() - before
                if commits_before is not None:
                    done = commits(server) - commits_before
                    result["per_commit"] = result["stored_after"] / max(1, done)
            attempts.append(result)
            if result["other_cores"] <= self.options.max_other_cores:
                break
            if attempt < self.options.retries:
                say(f"    {label}: other jobs took {result['other_cores']:.2f} cores; run again")
        best = min(attempts, key=lambda result: result["other_cores"])
        best["disturbed"] = best["other_cores"] > self.options.max_other_cores
        return best


def say(text: str) -> None:
    print(text, flush=True)


def single_readings(bench: Bench, servers: dict[str, Server]) -> None:
    """Keep-alive at 16 and 64 connections, then one connection per reading; runs interleave
    the servers so a slow moment of the machine hits all of them alike."""
    options = bench.options
    loads = [("keepalive16", 16, False), ("keepalive64", 64, False), ("close16", 16, True)]
    for load, connections, close in loads:
        for server in servers.values():
            bench.hit(server, connections, close, options.warmup)
        for run in range(options.runs):
            for name, server in servers.items():

                def one_run(server=server, connections=connections, close=close) -> dict:
                    return bench.hit(server, connections, close, options.duration)

                def count(server=server) -> int:
                    settle(server)
                    return stored_count(server, bench.key)

                # Count what the store holds around each run of ours: every 201 must be in it.
                counter = None if name == "bare" else count
                result = bench.steady(server, one_run, f"{load} {name}", counter)
                bench.measure(f"{load}/{name}").runs.append(result)
                say(
                    f"  {load:12} {name:7} run {run + 1}: {result['rate']:9.0f} readings/s"
                    f"  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
                    f"  server {result['server_cores']:.2f} cores"
                    f" {result['cpu_us']:.0f} us/reading"
                    + (
                        f"  201s {result['created']} stored {result['stored_after']}"
                        if "stored_after" in result
                        else ""
                    )
                )


def batches_and_million(bench: Bench) -> None:
    """Batches of 1,000 into SQLite, then fill the store to the wanted size and read the memory."""
    options = bench.options
    folder = bench.folder("batches")
    server = our_server("sqlite-batches", folder, bench.key, options.log_level).start()
    try:
        measure_batches(bench, server, "sqlite")
        have = stored_count(server, bench.key)
        if have < options.stored_readings:
            result = run_loader(
                server.port,
                bench.key,
                4,
                0,
                False,
                "batch",
                total=options.stored_readings - have,
                tag="fill",
            )
            say(f"  filled the store at {result['rate']:.0f} readings/s")
        time.sleep(1.0)
        stored = stored_count(server, bench.key)
        rss = memory_kb(server.pid)
        bench.measure("rss/stored").runs.append({"kb": rss, "stored": stored})
        say(f"  memory with {stored} stored readings: {rss / 1024:.1f} MB")
    finally:
        server.stop()


def fan_out_and_memory(bench: Bench) -> None:
    """Per run, on a fresh server: idle memory; memory with 1,000 idle subscribers; fan-out to those
    1,000 at 10 readings/s; then fan-out to 200 subscribers at 100 readings/s."""
    options = bench.options
    for run in range(options.runs):
        folder = bench.folder(f"fanout{run}")
        server = our_server("sqlite-fanout", folder, bench.key, options.log_level).start()
        try:
            time.sleep(1.0)
            idle = memory_kb(server.pid)
            subscribers = Subscribers(server.port, bench.key, 1000, folder / "received.json")
            time.sleep(1.0)
            loaded = memory_kb(server.pid)
            per = (loaded - idle) / max(1, subscribers.connected)
            bench.measure("rss/idle").runs.append({"kb": idle})
            bench.measure("rss/subscribers").runs.append(
                {"kb": loaded, "per_kb": per, "subscribers": subscribers.connected}
            )
            say(
                f"  memory       run {run + 1}: idle {idle / 1024:.1f} MB,"
                f" {subscribers.connected} subscribers {loaded / 1024:.1f} MB ({per:.1f} KB each)"
            )
            for name, count, rate in (("fanout1000", 1000, 10), ("fanout200", 200, 100)):
                if subscribers is None:
                    out = folder / f"received{count}.json"
                    subscribers = Subscribers(server.port, bench.key, count, out)
                    time.sleep(0.5)
                result = fan_out_run(server, subscribers, bench.key, rate, options.fanout_duration)
                subscribers = None
                bench.measure(name).runs.append(result)
                say(
                    f"  {name:12} run {run + 1}: {result['subscribers']} subscribers,"
                    f" {result['readings']} readings, p50 {result['p50_ms']:.2f} ms,"
                    f" p99 {result['p99_ms']:.2f} ms, missing {result['missing']}"
                )
        finally:
            server.stop()


def influx_unavailable() -> str | None:
    if not (HERE / "influx_standin.py").exists():
        return "influx_standin.py is not present"
    if "INFLUX_HOST" not in (HERE / "app.py").read_text():
        return "app.py does not support INFLUX_HOST yet"
    return None


def start_standin(folder: Path, token: str) -> tuple[subprocess.Popen, int]:
    command = [
        sys.executable,
        str(HERE / "influx_standin.py"),
        "--http-port",
        "0",
        "--flight-port",
        "0",
        "--control-port",
        "0",
        "--token",
        token,
    ]
    log = open(folder / "standin.log", "ab")
    process = spawn(command, env=base_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    line = process.stdout.readline()
    if not line:
        forget(process)
        raise RuntimeError("the InfluxDB stand-in did not start")
    return process, json.loads(line)["http_port"]


def start_influx_mode(
    bench: Bench, servers: dict[str, Server]
) -> tuple[subprocess.Popen | None, str | None]:
    """The stand-in and our server pointed at it; a reason instead when the server does not
    actually use InfluxDB (its health reports which store it writes to)."""
    token = secrets.token_urlsafe(24)
    folder = bench.folder("influx")
    standin, http_port = start_standin(folder, token)
    server = our_server(
        "influx",
        folder,
        bench.key,
        bench.options.log_level,
        INFLUX_HOST=f"http://{LOOPBACK}:{http_port}",
        INFLUX_TOKEN=token,
        INFLUX_DATABASE="bench",
    )
    try:
        server.start()
    except RuntimeError as error:
        forget(standin)
        server.stop()
        return None, f"our server did not start in InfluxDB mode ({str(error)[:80]})"
    kind = health(server).get("store", {}).get("kind", "unknown")
    if kind == "sqlite":
        server.stop()
        forget(standin)
        return None, "app.py reads INFLUX_HOST but still stores in SQLite"
    server.helpers = (standin.pid,)
    servers["influx"] = server
    return standin, None


def measure_batches(bench: Bench, server: Server, store: str) -> None:
    """Batches of 1,000 readings from 4 connections: a warm-up, then the measured runs."""
    options = bench.options
    run_loader(server.port, bench.key, 4, options.warmup, False, "batch", tag=f"{store}-warm")
    for run in range(options.runs):

        def one_run(run=run) -> dict:
            return run_loader(
                server.port, bench.key, 4, options.duration, False, "batch", tag=f"{store}{run}"
            )

        result = bench.steady(server, one_run, f"{store} batches")
        bench.measure(f"batch/{store}").runs.append(result)
        say(f"  batches      {store:<7} run {run + 1}: {result['rate']:9.0f} readings/s")


# --- Report ----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def ratio_to_bare(results: dict[str, Measure], load: str, name: str) -> float:
    ours, bare = results[f"{load}/{name}"].runs, results[f"{load}/bare"].runs
    return statistics.median(o["rate"] / b["rate"] for o, b in zip(ours, bare, strict=False))


def build_tables(bench: Bench) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Markdown lines of the result tables, and the targets as (target, measured, result)."""
    results, lines, targets = bench.results, [], []
    servers = [("bare", "bare Starlette"), ("sqlite", "ours, SQLite"), ("influx", "ours, InfluxDB")]
    loads = [
        ("keepalive16", "keep-alive, 16 connections"),
        ("keepalive64", "keep-alive, 64 connections"),
        ("close16", "new connection per reading, 16 at a time"),
    ]
    lines += [
        "### Single readings (POST /api/v1/temperature_reading)",
        "",
        "| load | server | readings/s | p50 ms | p99 ms | ours / bare | server CPU"
        " | CPU us per reading | readings per commit | runs (readings/s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for load, title in loads:
        for name, label in servers:
            measure = results.get(f"{load}/{name}")
            if measure is None:
                continue
            if measure.skipped:
                lines.append(f"| {title} | {label} | skipped: {measure.skipped} |" + " |" * 7)
                continue
            ratio = "" if name == "bare" else fmt(ratio_to_bare(results, load, name), 2) + "x"
            runs = ", ".join(
                fmt(run["rate"]) + ("*" if run.get("disturbed") else "") for run in measure.runs
            )
            lines.append(
                f"| {title} | {label} | {fmt(measure.median('rate'))}"
                f" | {fmt(measure.median('p50_ms'), 2)} | {fmt(measure.median('p99_ms'), 2)}"
                f" | {ratio} | {fmt(measure.median('server_cores'), 2)} cores"
                f" | {fmt(measure.median('cpu_us'))} | {fmt(measure.median('per_commit'), 1)}"
                f" | {runs} |"
            )
    lines += [
        "",
        "Ours / bare is the median of the per-run ratios (each run of ours follows one of bare)."
        " Server CPU is user + system time of the server process and its writer process, all"
        " threads. Runs marked *"
        " had another job on the machine taking over"
        f" {bench.options.max_other_cores:g} cores in every attempt.",
        "",
    ]

    keep = results.get("keepalive64/sqlite")
    if keep and not keep.skipped:
        ratio = ratio_to_bare(results, "keepalive64", "sqlite")
        targets.append(("keep-alive 64 conns: ours >= 0.6x bare", f"{ratio:.2f}x", ratio >= 0.6))
        p99 = keep.median("p99_ms")
        targets.append(("keep-alive 64 conns: p99 < 25 ms", f"{p99:.2f} ms", p99 < 25))
    close = results.get("close16/sqlite")
    if close and not close.skipped:
        ratio = ratio_to_bare(results, "close16", "sqlite")
        targets.append(
            ("new connection per reading: ours >= 0.7x bare", f"{ratio:.2f}x", ratio >= 0.7)
        )

    durability = []
    for load in ("keepalive16", "keepalive64"):
        for name in ("sqlite", "influx"):
            measure = results.get(f"{load}/{name}")
            if measure is None or measure.skipped:
                continue
            for run in measure.runs:
                gap = run["stored_after"] - run["created"]
                # wrk stops with requests in flight: the server may store those without the
                # 201 being counted, so up to one per connection may be stored beyond the 201s.
                allowed = 0 if run["drained"] else int(load[len("keepalive") :])
                durability.append((load, name, run["created"], run["stored_after"], gap, allowed))
    if durability:
        lines += [
            "Durability in the keep-alive runs: readings counted by GET /api/v1/sensors after"
            " each run, against the 201s the load generator received.",
            "",
            "| load | server | 201s | stored | stored - 201s | allowed (requests in flight) |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for load, name, created, stored, gap, allowed in durability:
            lines.append(f"| {load} | {name} | {created:,} | {stored:,} | {gap} | 0..{allowed} |")
        lines.append("")
        ok = all(0 <= gap <= allowed for *_, gap, allowed in durability)
        lost = sum(max(0, -gap) for *_, gap, _ in durability)
        extra = sum(max(0, gap - allowed) for *_, gap, allowed in durability)
        shown = f"{lost} missing" + (f", {extra} unexplained extra" if extra else "")
        targets.append(("every 201 is in the store", shown, ok))

    lines += [
        f"### Batches of {BATCH_SIZE:,} readings (POST /api/v1/readings, 4 connections)",
        "",
        "| store | readings/s | p50 ms per batch | p99 ms per batch | server CPU"
        " | CPU us per reading | runs (readings/s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, label in servers[1:]:
        measure = results.get(f"batch/{name}")
        if measure is None:
            continue
        if measure.skipped:
            lines.append(f"| {label} | skipped: {measure.skipped} | | | | | |")
            continue
        runs = ", ".join(fmt(value) for value in measure.values("rate"))
        lines.append(
            f"| {label} | {fmt(measure.median('rate'))} | {fmt(measure.median('p50_ms'), 1)}"
            f" | {fmt(measure.median('p99_ms'), 1)}"
            f" | {fmt(measure.median('server_cores'), 2)} cores"
            f" | {fmt(measure.median('cpu_us'), 1)} | {runs} |"
        )
    lines.append("")
    batch = results.get("batch/sqlite")
    if batch and batch.runs:
        rate = batch.median("rate")
        targets.append(("batches into SQLite >= 80,000 readings/s", fmt(rate), rate >= 80_000))

    lines += [
        "### WebSocket fan-out (delay from the poster's 201 to each subscriber's receipt)",
        "",
        "| subscribers | readings/s | messages | missing | p50 ms | p99 ms"
        " | POST p50 / p99 ms | p99 ms from POST sent | runs (p99 ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, rate, limit in (("fanout200", 100, 25), ("fanout1000", 10, 50)):
        measure = results.get(name)
        if measure is None or not measure.runs:
            continue
        runs = ", ".join(fmt(value, 2) for value in measure.values("p99_ms"))
        lines.append(
            f"| {fmt(measure.median('subscribers'))} | {rate} | {fmt(measure.median('messages'))}"
            f" | {fmt(measure.median('missing'))} | {fmt(measure.median('p50_ms'), 2)}"
            f" | {fmt(measure.median('p99_ms'), 2)}"
            f" | {fmt(measure.median('post_p50_ms'), 2)} / {fmt(measure.median('post_p99_ms'), 2)}"
            f" | {fmt(measure.median('p99_from_send_ms'), 2)}"
            f" | {runs} |"
        )
        p99 = measure.median("p99_ms")
        subscribers = int(measure.median("subscribers"))
        post = measure.median("post_p99_ms")
        targets.append(
            (
                f"fan-out {subscribers} subscribers @ {rate}/s: p99 < {limit} ms",
                f"{p99:.2f} ms (POST p99 {post:.1f} ms)",
                p99 < limit and measure.median("missing") == 0,
            )
        )
    lines.append("")

    lines += [
        "### Resident memory of our server (SQLite mode)",
        "",
        "The server's resident set plus the pages its writer process holds for itself (the",
        "rest it shares with the server, from which it was forked): each page counted once.",
        "",
        "| state | MB | runs (MB) |",
        "| --- | ---: | --- |",
    ]
    idle = results.get("rss/idle")
    subs = results.get("rss/subscribers")
    stored = results.get("rss/stored")
    if idle and idle.runs:
        runs = ", ".join(fmt(kb / 1024, 1) for kb in idle.values("kb"))
        lines.append(f"| idle, just started | {fmt(idle.median('kb') / 1024, 1)} | {runs} |")
        mb = idle.median("kb") / 1024
        targets.append(("idle memory < 60 MB", f"{mb:.1f} MB", mb < 60))
    if subs and subs.runs:
        runs = ", ".join(fmt(kb / 1024, 1) for kb in subs.values("kb"))
        count = fmt(subs.median("subscribers"))
        lines.append(f"| {count} idle subscribers | {fmt(subs.median('kb') / 1024, 1)} | {runs} |")
        per = subs.median("per_kb")
        lines.append(f"| per idle subscriber (KB) | {fmt(per, 1)} | |")
        targets.append(("< 20 KB per idle subscriber", f"{per:.1f} KB", per < 20))
    if stored and stored.runs:
        kb, count = stored.median("kb"), stored.median("stored")
        lines.append(f"| after {fmt(count)} stored readings (1 run) | {fmt(kb / 1024, 1)} | |")
    lines.append("")
    return lines, targets


def machine_lines(bench: Bench) -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    loader = "wrk (1 thread, Lua script)" if bench.loader == "wrk" else "asyncio load generator"
    if bench.loader == "wrk":
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
        loader = f"wrk {version[1] if len(version) > 1 else ''} (1 thread, Lua script)"
    return [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu}, {os.cpu_count()} cores (load generator, subscribers and server share them)",
        f"- Memory: {memory_kb / 1024 / 1024:.1f} GiB",
        f"- OS: {platform.system()} {platform.release()}; temp folder on {filesystem(bench.root)}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        f"- app.py: {bench.version}",
        f"- Packages: {', '.join(versions)}",
        f"- Load: {loader}; batches and the paced fan-out poster use this script's own clients",
        f"- Settings: {bench.options.runs} runs per measurement (median shown),"
        f" {bench.options.duration:g} s per run, fan-out {bench.options.fanout_duration:g} s"
        f" per run, our server at LOG_LEVEL={bench.options.log_level}",
    ]


def app_version() -> str:
    """The commit app.py was measured at, and whether it had changes not yet committed."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "app.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not in a git checkout"
    return f"commit {commit}" + (" with changes not yet committed" if changed else "")


def filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def kept_time_section(path: Path) -> str:
    if path.exists():
        text = path.read_text()
        start, end = text.find(TIME_SECTION_START), text.find(TIME_SECTION_END)
        if 0 <= start < end:
            return text[start + len(TIME_SECTION_START) : end].strip()
    return TIME_SECTION_PLACEHOLDER


def write_report(bench: Bench, path: Path) -> str:
    tables, targets = build_tables(bench)
    lines = [
        "# SensorFlow Server benchmarks",
        "",
        "Produced by `python bench.py`"
        + (
            " (`--quick` smoke run: one short run each, not for comparison)"
            if bench.options.quick
            else ""
        )
        + '. Everything runs on one machine over 127.0.0.1. "Bare" is a Starlette endpoint on'
        " the same uvicorn settings (uvloop, httptools, one worker, no access log) that only"
        " parses the JSON body and answers 201: the ceiling of our stack. Our server validates,"
        " commits every reading to the store before answering (SQLite in WAL mode with"
        " synchronous=FULL, group commits), and pushes it to subscribers.",
        "",
        "## Machine",
        "",
        *machine_lines(bench),
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "| --- | ---: | --- |",
        *[f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in targets],
        "",
        "## Results",
        "",
        *tables,
        "Latency is measured by the load generator from sending a request to its full answer."
        " Fan-out delays can be negative: the server queues a reading for its subscribers just"
        " before it answers the poster, so the 201 waits behind the fan-out (POST p50 / p99) and"
        " most subscribers have the reading before the poster has its 201. The column"
        ' "p99 ms from POST sent" measures from the moment the poster sent the reading.',
        "",
        *[f"{note}\n" if note else "" for note in bench.notes],
        "## Where the time goes",
        "",
        TIME_SECTION_START,
        kept_time_section(path),
        TIME_SECTION_END,
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return "\n".join(["Targets:"] + [f"  {verdict(ok):4}  {n}: {v}" for n, v, ok in targets])


# --- Main ------------------------------------------------------------------------------------


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (5)")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument("--fanout-duration", type=float, default=None, help="seconds (10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds per server (1)")
    parser.add_argument(
        "--stored-readings",
        type=int,
        default=None,
        help="store size for the memory reading (1,000,000)",
    )
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--log-level", default="INFO", help="our server's LOG_LEVEL (INFO)")
    parser.add_argument(
        "--retries", type=int, default=1, help="reruns of a run disturbed by another job (1)"
    )
    parser.add_argument(
        "--max-other-cores",
        type=float,
        default=0.3,
        help="CPU other processes may take during a run before it counts as disturbed (0.3)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="report file (BENCHMARKS.md beside this script; --quick and --only runs write"
        " one only when this is given)",
    )
    parser.add_argument("--only", default="", help="comma list of: single,batch,fanout")
    parser.add_argument("--no-influx", action="store_true", help="skip the InfluxDB mode")
    parser.add_argument(
        "--hold",
        type=float,
        default=0,
        metavar="SECONDS",
        help="only hold 64-connection keep-alive load on our server for SECONDS and print its"
        " pid, to attach a profiler (py-spy record --pid PID)",
    )
    # Internal roles of this file, each run as its own process.
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--subscribe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--close", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="bench-p", help=argparse.SUPPRESS)
    parser.add_argument("--subscribers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    options = parser.parse_args()
    quick = options.quick
    defaults = {
        "duration": 2.0 if quick else 5.0,
        "runs": 1 if quick else 3,
        "fanout_duration": 3.0 if quick else 10.0,
        "warmup": 0.5 if quick else 1.0,
        "stored_readings": 100_000 if quick else 1_000_000,
    }
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    return options


def run_internal_role(options: argparse.Namespace) -> bool:
    if options.bare_server:
        run_bare_server(options.bare_server)
        return True
    if options.load:
        import uvloop

        options.port = options.load
        print(json.dumps(uvloop.run(drive(options))), flush=True)
        return True
    if options.subscribe:
        import uvloop

        raise_open_file_limit()
        options.port = options.subscribe
        uvloop.run(subscribe(options))
        return True
    return False


def main() -> None:
    options = parse_options()
    if run_internal_role(options):
        return
    atexit.register(stop_all)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: sys.exit(1))
    open_files = raise_open_file_limit()
    if open_files < 2500:
        say(f"warning: only {open_files} open files allowed; the 1,000-subscriber runs may fail")

    loader = options.loader
    if loader == "auto":
        loader = "wrk" if shutil.which("wrk") else "python"
    if loader == "wrk" and not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk); use --loader python")
    only = set(filter(None, options.only.split(","))) or {"single", "batch", "fanout"}

    root = Path(tempfile.mkdtemp(prefix="sensorflow-bench-"))
    bench = Bench(options, secrets.token_urlsafe(24), root, loader, version=app_version())
    started = time.monotonic()
    say(f"load generator: {loader}; {options.runs} runs of {options.duration:g} s each")
    try:
        servers = {
            "bare": bare_server(bench.folder("bare")).start(),
            "sqlite": our_server(
                "sqlite", bench.folder("sqlite"), bench.key, options.log_level
            ).start(),
        }
        if options.hold:
            say(f"holding keep-alive load on pid {servers['sqlite'].pid} for {options.hold:g} s")
            result = bench.hit(servers["sqlite"], 64, False, options.hold)
            say(f"  {result['rate']:.0f} readings/s, p99 {result['p99_ms']:.2f} ms")
            return
        influx_reason = "--no-influx was given" if options.no_influx else influx_unavailable()
        standin = None
        if influx_reason is None:
            standin, influx_reason = start_influx_mode(bench, servers)
        for load in ("keepalive16", "keepalive64", "close16"):
            if influx_reason:
                bench.skip(f"{load}/influx", influx_reason)
        if influx_reason:
            bench.skip("batch/influx", influx_reason)

        if "single" in only:
            say("single readings")
            single_readings(bench, servers)
        if "influx" in servers and "batch" in only:
            measure_batches(bench, servers["influx"], "influx")
        if "influx" in servers:
            bench.notes.append(
                "InfluxDB mode answers 201 once a reading is committed to its local spool and"
                " delivers it to InfluxDB just after; before counting, the benchmark waited up to"
                f" {servers['influx'].settle_seconds:.1f} s for the spool to empty. The stand-in"
                " is a Python test double on the same cores, not a real InfluxDB: these rows"
                " show our client path under load, not InfluxDB's speed."
            )
        for server in servers.values():
            server.stop()
        if standin is not None:
            forget(standin)
        if "batch" in only:
            say("batches")
            batches_and_million(bench)
        if "fanout" in only:
            say("fan-out and memory")
            fan_out_and_memory(bench)
    except BaseException:
        say(f"stopped early; server logs are kept in {root}")
        raise
    finally:
        stop_all()

    if app_version() != bench.version:
        bench.notes.append(
            f"app.py changed during the run (at the end: {app_version()}); rows measured"
            " after the change may differ from the earlier ones."
        )
    minutes = (time.monotonic() - started) / 60
    bench.notes.append(f"The whole benchmark took {minutes:.1f} minutes.")
    others = [
        run["other_cores"]
        for measure in bench.results.values()
        for run in measure.runs
        if "other_cores" in run
    ]
    if others:
        bench.notes.append(
            "CPU taken by other jobs on the machine during the measured runs:"
            f" median {statistics.median(others):.2f} cores, highest {max(others):.2f}"
            f" (runs over {options.max_other_cores:g} cores were repeated up to"
            f" {options.retries} times)."
        )
    bench.notes.append("")
    shutil.rmtree(root, ignore_errors=True)
    if options.output:
        output = Path(options.output)
    elif options.quick or options.only:
        output = root.with_name(root.name + ".md")  # a partial run leaves BENCHMARKS.md alone
    else:
        output = HERE / "BENCHMARKS.md"
    summary = write_report(bench, output)
    print()
    print(output.read_text().split("## Where the time goes")[0])
    print(summary)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
