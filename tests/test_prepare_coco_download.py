"""COCO downloads resume from a partial file and are checked against their MD5, over a local HTTP server."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from training.downloads import download

PAYLOAD = bytes(range(256)) * 12_000  # 3 MB


class RangeHandler(BaseHTTPRequestHandler):
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self):
        requested = self.headers.get("Range")
        self.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
        if start >= len(PAYLOAD):  # as a real server answers a range past the end
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.ranges = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/train2017.zip"
    httpd.shutdown()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    target = tmp_path / "train2017.zip"
    (tmp_path / "train2017.zip.part").write_bytes(PAYLOAD[:1_000_000])  # what an interrupted run left
    download(server, target, hashlib.md5(PAYLOAD).hexdigest())
    assert RangeHandler.ranges == ["bytes=1000000-"]
    assert target.read_bytes() == PAYLOAD and not (tmp_path / "train2017.zip.part").exists()
    download(server, target, hashlib.md5(PAYLOAD).hexdigest())  # already there and verified: no request
    assert len(RangeHandler.ranges) == 1


def test_a_corrupt_download_is_deleted_and_reported(server, tmp_path):
    with pytest.raises(OSError, match=r"MD5 .* differs from the published 0+; the file was deleted"):
        download(server, tmp_path / "train2017.zip", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_a_download_killed_while_its_md5_was_checked_finishes(server, tmp_path):
    """The whole file is in .part (the run died during the check): the server answers 416, and that is done."""
    (tmp_path / "train2017.zip.part").write_bytes(PAYLOAD)
    target = download(server, tmp_path / "train2017.zip", hashlib.md5(PAYLOAD).hexdigest())
    assert RangeHandler.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert target.read_bytes() == PAYLOAD and not (tmp_path / "train2017.zip.part").exists()
