"""A reverse proxy on loopback asking for HTTP basic auth on every path, as nginx's `auth_basic` does in front of a
tracking server (the README's way to expose one): a request without the right credentials gets 401, the others are
forwarded to the server and its answer sent back."""
import base64
import contextlib
import http.client
import http.server
import threading
from typing import Iterator

HOP_BY_HOP = {"authorization", "connection", "content-length", "host", "keep-alive", "transfer-encoding"}


def _handler(upstream_port: int, expected: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()  # the empty line after the last chunk
            return b"".join(chunks)

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def forward(self) -> None:
            body = self._body()  # read even when refused: the connection is kept alive
            if self.headers.get("Authorization") != expected:
                return self._answer(401, [("WWW-Authenticate", 'Basic realm="mlflow"')], b"401 Authorization Required")
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
            try:
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP})
                answer = conn.getresponse()
                self._answer(answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP],
                             answer.read())
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

    return Handler


@contextlib.contextmanager
def basic_auth_proxy(upstream_port: int, user: str, password: str) -> Iterator[str]:
    """The proxy's URL, for as long as the block runs."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream_port, expected))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
