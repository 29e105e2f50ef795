#!/usr/bin/env python3
"""A webhook endpoint for streamworker in 50 lines: verifies the signature, handles the
entry, answers 2xx (acknowledge), 4xx (dead-letter now) or 5xx (retry later).

Usage: webhook-receiver.py PORT SECRET [HOST]   (HOST defaults to 127.0.0.1)
"""
import hashlib, hmac, json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SECRET = int(sys.argv[1]), sys.argv[2].encode()
HOST = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
lock, counts = threading.Lock(), {"handled": 0, "rejected": 0}


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep connections alive: streamworker pools them

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        ts = self.headers.get("x-streamworker-timestamp", "")
        sig = self.headers.get("x-streamworker-signature", "")
        mac = hmac.new(SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, "sha256=" + mac):
            return self.answer(401, "bad signature")
        entry = json.loads(body)
        if entry["fields"].get("event_type") == "malformed":
            with lock:
                counts["rejected"] += 1
            return self.answer(422, "event_type 'malformed' cannot be processed")
        with lock:
            counts["handled"] += 1
        self.answer(200, "ok")

    def do_GET(self):
        with lock:
            self.answer(200, json.dumps(counts))

    def answer(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # streamworker opens up to `concurrency` connections at once


Server((HOST, PORT), Receiver).serve_forever()
