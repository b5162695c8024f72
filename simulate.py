"""Play virtual sensor boards that post readings to a SensorFlow server.

Each board follows a daily temperature cycle (a sine over 24 hours with its own offset and
phase) plus noise; humidity moves against temperature and pressure drifts slowly around
1013 hPa. Every reading goes out on its own HTTP connection, as a real board sends it.

Options add deliberately bad readings (NaN, values out of range, the -999 error code) and
link outages: while the link is down a board buffers its readings with device timestamps
(epoch milliseconds) and resends them as one batch when the link returns. Bad readings are
only made while the link is up, so a batch holds good readings only.

    python simulate.py --sensors 3 --interval 5
    python simulate.py --bad-fraction 0.2 --offline-every 60 --offline-for 20 --duration 300

The API key comes from --key, else API_KEY (environment or a .env in the current folder),
else the key file the server writes beside its database (sensorflow.db.key here).
"""

import argparse
import http.client
import json
import math
import os
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

READING_PATH = "/api/v1/temperature_reading"
BATCH_PATH = "/api/v1/readings"
TIMEOUT_SECONDS = 10
BUFFER_SIZE = 500  # readings a board keeps while it cannot send; the oldest go first
SEA_LEVEL_HPA = 1013.25
ERROR_CODE = -999.0  # what many sensor drivers report instead of a value


# --- Settings ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    load_dotenv(".env")  # the server's own settings; never overrides the environment
    default_url = f"http://127.0.0.1:{os.environ.get('PORT') or 8000}"
    parser = argparse.ArgumentParser(description="Post simulated sensor readings.")
    parser.add_argument("--url", default=default_url, help=f"server (default {default_url})")
    parser.add_argument("--key", help="API key (default: API_KEY, .env, sensorflow.db.key)")
    parser.add_argument("--sensors", type=int, default=3, help="virtual boards (default 3)")
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between readings (default 5)"
    )
    parser.add_argument(
        "--bad-fraction", type=float, default=0.0, help="share of bad readings, 0 to 1"
    )
    parser.add_argument(
        "--offline-every", type=float, default=0.0, help="seconds between link outages (0: none)"
    )
    parser.add_argument("--offline-for", type=float, default=0.0, help="seconds an outage lasts")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--count", type=int, help="stop after this many readings per board")
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    args = parser.parse_args(argv)

    if args.sensors < 1 or args.interval <= 0:
        parser.error("--sensors must be at least 1 and --interval above 0")
    if (args.count is not None and args.count < 1) or (
        args.duration is not None and args.duration <= 0
    ):
        parser.error("--count must be at least 1 and --duration above 0")
    if not 0 <= args.bad_fraction <= 1:
        parser.error("--bad-fraction must be between 0 and 1")
    if args.offline_every and not 0 < args.offline_for < args.offline_every:
        parser.error("--offline-for must be above 0 and below --offline-every")
    args.url = args.url.rstrip("/")
    args.key = args.key or find_key()
    if not args.key:
        parser.error("no API key: pass --key, set API_KEY, or run beside sensorflow.db.key")
    return args


def find_key() -> str | None:
    """The first key from API_KEY (environment or .env), else the server's key file."""
    keys = os.environ.get("API_KEY", "")
    if keys.strip():
        return keys.split(",")[0].strip()
    key_file = Path(os.environ.get("SQLITE_PATH", "sensorflow.db") + ".key")
    if key_file.is_file():
        return key_file.read_text().strip().split(",")[0].strip() or None
    return None


# --- Boards and their readings -------------------------------------------------------------


@dataclass
class Board:
    """One virtual board: its own climate, and a buffer for readings it could not send."""

    sensor_id: str
    rng: random.Random
    mean_temperature: float
    swing: float
    phase_hours: float
    mean_humidity: float
    pressure: float
    buffer: deque = field(default_factory=lambda: deque(maxlen=BUFFER_SIZE))

    @classmethod
    def make(cls, number: int, rng: random.Random) -> "Board":
        return cls(
            sensor_id=f"sim-{number:02d}",
            rng=random.Random(rng.random()),
            mean_temperature=rng.uniform(18, 24),
            swing=rng.uniform(2, 5),
            phase_hours=rng.uniform(-1.5, 1.5),
            mean_humidity=rng.uniform(40, 60),
            pressure=SEA_LEVEL_HPA + rng.uniform(-4, 4),
        )

    def measure(self, now: float) -> dict:
        local = time.localtime(now)
        hour = local.tm_hour + local.tm_min / 60 + local.tm_sec / 3600 - self.phase_hours
        # Coolest before dawn, warmest mid-afternoon.
        cycle = math.sin(2 * math.pi * (hour - 9) / 24)
        temperature = self.mean_temperature + self.swing * cycle + self.rng.gauss(0, 0.15)
        humidity = self.mean_humidity - 2.5 * (temperature - self.mean_temperature)
        humidity = min(100.0, max(0.0, humidity + self.rng.gauss(0, 0.8)))
        # A random walk pulled gently back towards its mean, like weather fronts passing.
        self.pressure += self.rng.gauss(0, 0.05) + 0.01 * (SEA_LEVEL_HPA - self.pressure)
        return {
            "sensor_id": self.sensor_id,
            "temperature": round(temperature, 2),
            "humidity": round(humidity, 1),
            "pressure": round(self.pressure, 2),
        }

    def spoil(self, reading: dict) -> dict:
        """A reading the server must refuse: NaN, out of range, or a driver's error code."""
        bad = dict(reading)
        kind = self.rng.choice(("nan", "out_of_range", "error_code"))
        if kind == "nan":
            bad["temperature"] = math.nan  # json.dumps writes the bare token NaN
        elif kind == "out_of_range":
            bad["humidity"] = round(self.rng.uniform(101, 150), 1)
        else:
            bad[self.rng.choice(("temperature", "humidity", "pressure"))] = ERROR_CODE
        return bad


# --- Sending and counting ------------------------------------------------------------------


@dataclass
class Tally:
    good: int = 0
    bad: int = 0
    stored: int = 0
    duplicates: int = 0
    errors: int = 0
    lost: int = 0
    refused: Counter = field(default_factory=Counter)

    def add(self, other: "Tally") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def line(self) -> str:
        return (
            f"good {self.good}  bad {self.bad}  stored {self.stored}  "
            f"duplicates {self.duplicates}  refused {sum(self.refused.values())}  "
            f"errors {self.errors}"
        )


def post(url: str, key: str, payload: dict | list) -> tuple[int, bytes] | None:
    """POST on a connection of its own: (status, body), or None when nothing came back."""
    parts = urlsplit(url)
    opener = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = opener(parts.hostname, parts.port, timeout=TIMEOUT_SECONDS)
    headers = {"X-API-Key": key, "Content-Type": "application/json", "Connection": "close"}
    try:
        connection.request("POST", parts.path, json.dumps(payload).encode(), headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def can_retry(answer: tuple[int, bytes] | None) -> bool:
    """Busy, failing or unreachable: the same request may succeed later."""
    return answer is None or answer[0] == 429 or answer[0] >= 500


def keep(board: Board, reading: dict, taken_at: float, tally: Tally) -> None:
    if len(board.buffer) == BUFFER_SIZE:
        tally.lost += 1
    board.buffer.append({**reading, "timestamp": int(taken_at * 1000)})


def send_reading(
    args: argparse.Namespace, board: Board, reading: dict, taken_at: float, bad: bool, tally: Tally
) -> None:
    answer = post(args.url + READING_PATH, args.key, reading)
    if can_retry(answer):
        tally.errors += 1
        if not bad:
            keep(board, reading, taken_at, tally)
    elif answer[0] == 201:
        tally.stored += 1
    elif answer[0] == 200:
        tally.duplicates += 1
    else:
        tally.refused[answer[0]] += 1


def send_buffer(args: argparse.Namespace, board: Board, tally: Tally) -> None:
    batch = list(board.buffer)
    answer = post(args.url + BATCH_PATH, args.key, batch)
    if can_retry(answer):
        tally.errors += 1
        return
    status, body = answer
    if status in (200, 201):
        counts = json.loads(body)
        tally.stored += counts["stored"]
        tally.duplicates += counts["duplicates"]
    else:
        tally.refused[status] += len(batch)
    board.buffer.clear()


def play(args: argparse.Namespace, board: Board, link_up: bool, tally: Tally) -> None:
    """One reading from one board: buffered while the link is down, posted while it is up."""
    taken_at = time.time()
    reading = board.measure(taken_at)
    if not link_up:
        tally.good += 1
        keep(board, reading, taken_at, tally)
        return

    if board.buffer:
        send_buffer(args, board, tally)
    bad = board.rng.random() < args.bad_fraction
    if bad:
        reading = board.spoil(reading)
        tally.bad += 1
    else:
        tally.good += 1
    send_reading(args, board, reading, taken_at, bad, tally)


# --- The run -------------------------------------------------------------------------------


def link_is_down(args: argparse.Namespace, round_number: int) -> bool:
    """Outages follow the schedule, not the wall clock, so a slow machine sees the same ones."""
    if not args.offline_every:
        return False
    scheduled = round_number * args.interval
    return scheduled >= args.offline_every and scheduled % args.offline_every < args.offline_for


def round_is_due(args: argparse.Namespace, round_number: int, start: float) -> bool:
    """Whether round `round_number` (from 0) still belongs to the run: --count, --duration."""
    if args.count is not None and round_number >= args.count:
        return False
    if args.duration is None:
        return True
    scheduled = round_number * args.interval
    return scheduled < args.duration and time.monotonic() - start < args.duration


def run(args: argparse.Namespace) -> tuple[Tally, int]:
    rng = random.Random(args.seed)
    boards = [Board.make(number, rng) for number in range(1, args.sensors + 1)]
    total = Tally()
    start = time.monotonic()
    round_number = 0
    try:
        while round_is_due(args, round_number, start):
            time.sleep(max(0.0, start + round_number * args.interval - time.monotonic()))
            link_up = not link_is_down(args, round_number)
            tally = Tally()
            for board in boards:
                play(args, board, link_up, tally)
            total.add(tally)
            round_number += 1
            report_round(round_number, link_up, tally, boards)
    except KeyboardInterrupt:
        print("interrupted")

    # The run is over: the link is back for one last try at what the boards still hold.
    try:
        tally = Tally()
        for board in boards:
            if board.buffer:
                send_buffer(args, board, tally)
        if tally.stored or tally.duplicates or tally.errors or tally.refused:
            total.add(tally)
            print(
                f"final batch: stored {tally.stored}  duplicates {tally.duplicates}  "
                f"refused {sum(tally.refused.values())}  errors {tally.errors}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    total.lost += sum(len(board.buffer) for board in boards)
    return total, round_number


def report_round(round_number: int, link_up: bool, tally: Tally, boards: list[Board]) -> None:
    clock = time.strftime("%H:%M:%S")
    link = "up  " if link_up else "down"
    buffered = sum(len(board.buffer) for board in boards)
    print(
        f"{clock} round {round_number:>4}  link {link} {tally.line()}  buffered {buffered}",
        flush=True,
    )
    if tally.refused[401]:
        print("the server refused the API key (401): check --key or API_KEY", flush=True)
    if link_up and tally.errors and not (tally.stored or tally.duplicates):
        print("no answer from the server: is it running at that address? (see --url)", flush=True)


def report_total(total: Tally, rounds: int, sensors: int) -> None:
    by_status = ", ".join(f"{status}: {n}" for status, n in sorted(total.refused.items()))
    print(f"tally after {rounds} rounds of {sensors} sensors:")
    print(f"  sent good   {total.good}")
    print(f"  sent bad    {total.bad}")
    print(f"  stored      {total.stored}")
    print(f"  duplicates  {total.duplicates}")
    print(f"  refused     {sum(total.refused.values())}" + (f" ({by_status})" if by_status else ""))
    print(f"  errors      {total.errors}")
    print(f"  lost        {total.lost}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"posting as {args.sensors} sensor(s) to {args.url} every {args.interval} s", flush=True)
    total, rounds = run(args)
    report_total(total, rounds, args.sensors)
    # Readings refused on purpose (--bad-fraction) are expected; a wrong key, a lost reading or
    # a server that stored nothing are not: a script running this one can tell.
    failed = (
        total.lost or total.refused[401] or (total.good and not total.stored + total.duplicates)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
