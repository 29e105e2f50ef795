#!/usr/bin/env python3
"""Does a registered kind cost anything next to a built-in? Drains N pre-loaded entries with
`noop` (built in) and with `nothing` (registered through App::handler, does nothing), from
one binary (src/bin/drain-nothing.rs), runs interleaved, against one private redis-server;
prints entries/s per run and the medians.

    cargo build --profile fast -p custom-handler --bin drain-nothing
    python3 examples/custom-handler/bench-nothing.py target/fast/drain-nothing [N] [RUNS]
"""

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


class Redis:
    """Just enough RESP for XADD pipelines and XINFO GROUPS."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def send(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))

    def line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(1 << 16)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return int(rest) if kind == b":" else rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(1 << 16)
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data.decode()
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(line)

    def call(self, *args):
        self.send(*args)
        return self.reply()


def group_state(r, stream):
    """(entries read, lag, pending) of group `g`."""
    for g in r.call("XINFO", "GROUPS", stream):
        info = dict(zip(g[::2], g[1::2]))
        if info["name"] == "g":
            return info["entries-read"] or 0, info["lag"], info["pending"]
    return 0, None, None


def main():
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    work = tempfile.mkdtemp()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", work],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                r = Redis(port)
                r.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        rates = {"noop": [], "nothing": []}
        for run in range(runs):
            for kind in ("noop", "nothing"):
                stream = f"{{bench}}:{kind}:{run}"
                for start in range(0, n, 1000):
                    for i in range(start, min(n, start + 1000)):
                        r.send("XADD", stream, "*", "user_id", f"u{i % 1000}", "event_type", "page_view", "amount", i % 100, "ts", 1700000000)
                    for i in range(start, min(n, start + 1000)):
                        r.reply()
                config = os.path.join(work, f"{kind}-{run}.toml")
                with open(config, "w") as f:
                    f.write(
                        f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[http]\nlisten = ""\n'
                        f'[telemetry]\nlog_format = "json"\n'
                        f'[groups.g]\nstream = "{stream}"\nhandler = "{kind}"\nbatch_size = 512\nconcurrency = 1024\n'
                    )
                daemon = subprocess.Popen([binary, "run", "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                first = None
                while True:
                    read, lag, pending = group_state(r, stream)
                    now = time.perf_counter()
                    if first is None and read > 0:
                        first = (now, read)
                    if lag == 0 and pending == 0 and read >= n:
                        break
                    time.sleep(0.002)
                daemon.send_signal(signal.SIGTERM)
                daemon.wait()
                rate = (n - first[1]) / (now - first[0])
                rates[kind].append(rate)
                print(f"run {run + 1} {kind:8} {rate:10.0f} entries/s")
                r.call("DEL", stream)
        for kind, values in rates.items():
            print(f"median {kind:8} {statistics.median(values):10.0f} entries/s over {runs} runs of {n} entries")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
