#!/usr/bin/env python3
"""A/B drain of streamworker binaries and settings on one private redis-server per drain.

    python3 src/tools/bench/ab_drain.py ENTRIES RUNS LABEL=BINARY:BATCH_SIZE:CONCURRENCY ...

Each variant drains ENTRIES pre-loaded entries (the bench's shape: user_id, event_type,
message, timestamp; SIZE=1024 pads the message so an entry has about that many bytes of
names and values) with the `noop` handler; the variants take turns, RUNS times. Per drain:
entries/s, how busy Redis's main thread was (its CPU time from /proc between the first
entry read and the last acknowledged, divided by that time), the daemon's CPU per entry
and Redis's. Only python3 and redis-server are needed. How BENCHMARKS.md's "Redis
saturated" figures were measured: it isolates one change (two binaries, or two settings
of one) where `streamworker bench` measures one binary against the contenders.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

HZ = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def cmd(self, *args):
        self.s.sendall(resp(*args))
        return self.read()

    def read(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind in b"+-":
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2].decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ValueError(line)


def cpu_ticks(pid, tid=None):
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])


def preload(con, entries, size):
    message = ("What is quantum computing?" + " Tell me more." * (size // 14 + 1))[: max(size - 61, 26)]
    types = ["click", "prompt", "pageview", "feedback"]
    chunk = max(1, min(5000, (5 << 20) // size))
    for start in range(0, entries, chunk):
        batch = [
            resp("XADD", "bench", "*", "user_id", 100 + i % 900, "event_type", types[i % 4],
                 "message", message, "timestamp", "2025-07-25T18:00:00Z")
            for i in range(start, min(start + chunk, entries))
        ]
        con.s.sendall(b"".join(batch))
        for _ in batch:
            con.read()
    con.cmd("XGROUP", "CREATE", "bench", "bench", "0")


def drain(label, binary, batch, concurrency, entries, size):
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    con = Conn(port)
                    break
                except OSError:
                    time.sleep(0.05)
            preload(con, entries, size)
            config = os.path.join(d, "streamworker.toml")
            with open(config, "w") as f:
                f.write(
                    f'[redis]\nurl = "redis://127.0.0.1:{port}"\n[worker]\nconsumer = "ab"\n'
                    f'[http]\nlisten = "127.0.0.1:{free_port()}"\n[telemetry]\nlog_format = "json"\n'
                    f'[groups.bench]\nstream = "bench"\nhandler = "noop"\n'
                    f"batch_size = {batch}\nconcurrency = {concurrency}\n"
                )
            daemon = subprocess.Popen(
                [binary, "run", "-c", config],
                env={**os.environ, "RUST_LOG": "warn"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                started = None
                while True:
                    group = con.cmd("XINFO", "GROUPS", "bench")[0]
                    group = dict(zip(group[::2], group[1::2]))
                    read = group.get("entries-read") or 0
                    if started is None and read:
                        started = time.monotonic()
                        redis0, daemon0 = cpu_ticks(redis.pid, redis.pid), cpu_ticks(daemon.pid)
                    if started and read >= entries and group["pending"] == 0:
                        break
                    if daemon.poll() is not None:
                        sys.exit(f"{label}: {binary} exited with {daemon.returncode}")
                    time.sleep(0.01)
                wall = time.monotonic() - started
                redis_s = (cpu_ticks(redis.pid, redis.pid) - redis0) / HZ
                daemon_s = (cpu_ticks(daemon.pid) - daemon0) / HZ
            finally:
                daemon.terminate()
                daemon.wait()
        finally:
            redis.terminate()
            redis.wait()
    print(
        f"{label:12} {entries / wall:10.0f} entries/s  Redis busy {redis_s / wall * 100:5.1f} %  "
        f"daemon CPU {daemon_s / entries * 1e6:5.2f} µs/entry  Redis CPU {redis_s / entries * 1e6:5.2f} µs/entry",
        flush=True,
    )


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    entries, runs = int(sys.argv[1]), int(sys.argv[2])
    size = int(os.environ.get("SIZE", "100"))
    variants = []
    for spec in sys.argv[3:]:
        label, rest = spec.split("=", 1)
        binary, batch, concurrency = rest.rsplit(":", 2)
        variants.append((label, binary, int(batch), int(concurrency)))
    for _ in range(runs):
        for label, binary, batch, concurrency in variants:
            drain(label, binary, batch, concurrency, entries, size)


if __name__ == "__main__":
    main()
