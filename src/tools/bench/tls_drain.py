"""The one-stream drain over TLS (`rediss://`, a test CA, client certificates), for
comparing streamworker binaries: `python3 tls_drain.py OLD,NEW [ENTRIES] [RUNS]`.

Not part of `streamworker bench` (which runs without TLS): it needs `openssl` and
`redis-cli` built with TLS. It prints, per binary, the median drain rate, how busy Redis's
main thread was, and the daemon's CPU per entry. See BENCHMARKS.md.
"""
import os, subprocess, sys, time, tempfile, socket
D = tempfile.mkdtemp()
def certs():
    def run(*args):
        subprocess.run(["openssl", *args], cwd=D, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA", "-keyout", "ca.key", "-out", "ca.crt")
    open(f"{D}/server.ext", "w").write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    open(f"{D}/client.ext", "w").write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for n in ["server", "client"]:
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={n}", "-keyout", f"{n}.key", "-out", f"{n}.csr")
        run("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", f"{n}.crt", "-extfile", f"{n}.ext")
certs()
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
port = free_port()
tick = os.sysconf("SC_CLK_TCK")
srv = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
    "--tls-cert-file", f"{D}/server.crt", "--tls-key-file", f"{D}/server.key", "--tls-ca-cert-file", f"{D}/ca.crt",
    "--tls-auth-clients", "yes", "--save", "", "--appendonly", "no", "--dir", D, "--logfile", ""],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
cli = ["redis-cli", "--tls", "--cacert", f"{D}/ca.crt", "--cert", f"{D}/client.crt", "--key", f"{D}/client.key", "-p", str(port)]
def r(*args, **kw):
    return subprocess.run(cli + list(args), capture_output=True, text=True, **kw).stdout
time.sleep(0.5)
for _ in range(50):
    if r("PING").strip() == "PONG": break
    time.sleep(0.1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300000
lines = []
types = ["click", "prompt", "pageview", "feedback"]
for j in range(N):
    lines.append(f"XADD bench * user_id {100 + j % 900} event_type {types[j%4]} message \"What is quantum computing\" timestamp 2025-07-25T18:00:00Z\n")
cmds = "".join(lines)
def cpu(path):
    f = open(path).read().rsplit(") ", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def drain(binary):
    env = dict(os.environ, RUST_LOG="warn")
    r("FLUSHALL")
    subprocess.run(cli + ["--pipe"], input=cmds, capture_output=True, text=True)
    r("XGROUP", "CREATE", "bench", "bench", "0")
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'''[redis]
url = "rediss://127.0.0.1:{port}/0"
tls = {{ ca_file = "{D}/ca.crt", cert_file = "{D}/client.crt", key_file = "{D}/client.key" }}
[worker]
consumer = "bench-0"
[groups.bench]
stream = "bench"
handler = "noop"
batch_size = 512
concurrency = 1024
''')
    cfg.close()
    p = subprocess.Popen([binary, "run", "-c", cfg.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    started = None
    while True:
        info = r("XINFO", "GROUPS", "bench").split("\n")
        kv = dict(zip(info[0::2], info[1::2]))
        read = int(kv.get("entries-read", "0") or 0)
        now = time.time()
        if started is None and read > 0:
            started = now; b0 = cpu(f"/proc/{srv.pid}/task/{srv.pid}/stat")
        if kv.get("lag") == "0" and kv.get("pending") == "0" and read >= N:
            break
        time.sleep(0.02)
    b1 = cpu(f"/proc/{srv.pid}/task/{srv.pid}/stat")
    c = cpu(f"/proc/{p.pid}/stat")
    p.terminate(); p.wait()
    secs = now - started
    return N / secs, (b1 - b0) / secs, c * 1e6 / N
bins = sys.argv[1].split(",")
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
res = {b: [] for b in bins}
for i in range(runs):
    for b in bins:
        res[b].append(drain(b))
        print(b, "%.0f entries/s, busy %.0f %%, consumer %.2f us/entry" % (res[b][-1][0], res[b][-1][1]*100, res[b][-1][2]), file=sys.stderr)
srv.terminate(); srv.wait()
import statistics
for b in bins:
    rs = res[b]
    print("%s: median %.0f entries/s, Redis busy %.0f %%, consumer CPU %.2f us/entry" % (b, statistics.median(x[0] for x in rs), 100*statistics.median(x[1] for x in rs), statistics.median(x[2] for x in rs)))
