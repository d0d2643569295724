"""Verified, resumable downloads against a local HTTP server on 127.0.0.1."""

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dalle_pytorch.io.download import (
    DownloadError,
    ReleasedFile,
    cache_directory,
    download,
    fetch_released_file,
)

PAYLOAD = bytes(range(256)) * 4099  # ~1 MiB, not a multiple of the chunk size
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer:
    """Serves PAYLOAD at any path; honours `Range: bytes=N-` unless told not to; can cut a response short."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.cut_next_response_at: int | None = None
        self.honour_ranges = True
        self.missing_paths: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path in server.missing_paths:
                    self.send_error(404)
                    return
                start = 0
                requested = self.headers.get("Range")
                if requested and server.honour_ranges:
                    start = int(requested.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_next_response_at is not None:
                    # Promise the whole body, send part of it, then drop the connection.
                    body = body[: server.cut_next_response_at]
                    server.cut_next_response_at = None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str = "/file.bin") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("DALLE_PYTORCH_OFFLINE", raising=False)
    monkeypatch.delenv("DALLE_PYTORCH_BASE_URL", raising=False)
    file_server = FileServer()
    file_server.thread.start()
    yield file_server
    file_server.httpd.shutdown()
    file_server.httpd.server_close()


def test_complete_download_is_verified_and_renamed(server, tmp_path):
    destination = tmp_path / "cache" / "sub" / "file.bin"
    result = download(server.url(), destination, PAYLOAD_SHA256, size=len(PAYLOAD), progress=False)
    assert result == destination
    assert destination.read_bytes() == PAYLOAD
    assert sorted(p.name for p in destination.parent.iterdir()) == ["file.bin"]  # no .part left


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    destination = tmp_path / "file.bin"
    partial = tmp_path / "file.bin.part"
    server.cut_next_response_at = 300_000

    with pytest.raises(DownloadError, match="resume"):
        download(server.url(), destination, PAYLOAD_SHA256, size=len(PAYLOAD), progress=False)
    assert not destination.exists()
    assert partial.read_bytes() == PAYLOAD[:300_000]

    download(server.url(), destination, PAYLOAD_SHA256, size=len(PAYLOAD), progress=False)

    assert destination.read_bytes() == PAYLOAD and not partial.exists()
    assert [r["range"] for r in server.requests] == [None, "bytes=300000-"]


def test_server_without_range_support_restarts_from_scratch(server, tmp_path):
    destination = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"garbage that is not the start of the file")
    server.honour_ranges = False
    download(server.url(), destination, PAYLOAD_SHA256, progress=False)
    assert destination.read_bytes() == PAYLOAD


def test_wrong_checksum_raises_and_leaves_no_file(server, tmp_path):
    cache = tmp_path / "cache"
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download(server.url(), cache / "file.bin", wrong, progress=False)
    assert list(cache.iterdir()) == []


def test_wrong_size_raises_and_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match="expected 1000"):
        download(server.url(), tmp_path / "file.bin", PAYLOAD_SHA256, size=1000, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [None, "", "abc", "0" * 63, "g" * 64])
def test_missing_or_malformed_checksum_refuses_before_any_request(server, tmp_path, bad):
    with pytest.raises(ValueError, match="refusing to download"):
        download(server.url(), tmp_path / "file.bin", bad, progress=False)
    assert server.requests == []


def test_offline_environment_variable_blocks_the_network(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_OFFLINE", "1")
    destination = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="put it at") as raised:
        download(server.url(), destination, PAYLOAD_SHA256, progress=False)
    assert str(destination) in str(raised.value)
    assert server.requests == []


def test_unreachable_server_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DALLE_PYTORCH_OFFLINE", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    destination = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="could not reach") as raised:
        download(f"http://127.0.0.1:{port}/file.bin", destination, PAYLOAD_SHA256, progress=False, timeout=5)
    assert str(destination) in str(raised.value)


def test_http_error_is_a_download_error(server, tmp_path):
    server.missing_paths.add("/gone.bin")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/gone.bin"), tmp_path / "gone.bin", PAYLOAD_SHA256, progress=False)


def _released(sha256=PAYLOAD_SHA256):
    return ReleasedFile(
        cache_name="weights/file.bin",
        url="http://example.invalid/file.bin",
        sha256=sha256,
        size=len(PAYLOAD),
        description="test weights",
    )


def test_fetch_uses_the_base_url_mirror_and_then_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", server.url("/mirror/"))

    path = fetch_released_file(_released(), argument="weights_path", progress=False)
    assert path == tmp_path / "cache" / "weights" / "file.bin"
    assert path.read_bytes() == PAYLOAD
    assert [r["path"] for r in server.requests] == ["/mirror/weights/file.bin"]

    assert fetch_released_file(_released(), argument="weights_path", progress=False) == path
    assert len(server.requests) == 1  # served from the cache


def test_fetch_without_recorded_checksum_refuses_and_explains(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", server.url("/mirror/"))
    with pytest.raises(DownloadError, match="no SHA-256") as raised:
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path")
    message = str(raised.value)
    assert str(tmp_path / "weights" / "file.bin") in message and "weights_path=" in message
    assert server.requests == []
    # A file the user put in the cache is used as is.
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "file.bin").write_bytes(b"user supplied")
    assert fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path").read_bytes() == (
        b"user supplied"
    )


def test_fetch_offline_names_the_file_and_the_place(tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_OFFLINE", "true")
    monkeypatch.delenv("DALLE_PYTORCH_BASE_URL", raising=False)
    with pytest.raises(DownloadError, match="DALLE_PYTORCH_OFFLINE") as raised:
        fetch_released_file(_released(), tmp_path, argument="weights_path")
    assert "http://example.invalid/file.bin" in str(raised.value)
    assert str(tmp_path / "weights" / "file.bin") in str(raised.value)


def test_cache_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("DALLE_PYTORCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "dalle_pytorch"
    monkeypatch.setenv("DALLE_PYTORCH_CACHE", str(tmp_path / "env"))
    assert cache_directory() == tmp_path / "env"
    assert cache_directory(tmp_path / "explicit") == tmp_path / "explicit"
