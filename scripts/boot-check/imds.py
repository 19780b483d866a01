#!/usr/bin/env python3
"""The boot check's stand-in for EC2's instance metadata service (IMDSv2 only).

  imds.py PORT PUBLIC_IPV4 LOG

Listens on 127.0.0.1:PORT (QEMU forwards the guest's 169.254.169.254:80 there). A PUT of
/latest/api/token with X-aws-ec2-metadata-token-ttl-seconds gives a token; every GET must carry
it in X-aws-ec2-metadata-token (401 otherwise, as EC2 answers when IMDSv2 is required);
/latest/meta-data/public-ipv4 is PUBLIC_IPV4. Each request is one line of LOG.
"""

import http.server
import secrets
import sys

PORT, PUBLIC_IPV4, LOG = int(sys.argv[1]), sys.argv[2], sys.argv[3]
TOKEN = secrets.token_urlsafe(32)


class Imds(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if self.path == "/latest/api/token" and ttl.isdigit() and 1 <= int(ttl) <= 21600:
            self.answer(200, TOKEN, "a token")
        else:
            self.answer(400, "", "refused")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self.answer(401, "", "refused: no IMDSv2 token")
        elif self.path == "/latest/meta-data/public-ipv4":
            self.answer(200, PUBLIC_IPV4, PUBLIC_IPV4)
        else:
            self.answer(404, "", "not found")

    def answer(self, code, body, said):
        with open(LOG, "a") as log:
            print(f"{self.command} {self.path} -> {code} {said}", file=log, flush=True)
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Imds).serve_forever()
