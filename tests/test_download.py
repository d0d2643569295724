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
    pin_variable,
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


def _payload_only(path):
    """A structure check: the file must be PAYLOAD (as a reader's key and shape checks would insist)."""
    if path.read_bytes() != PAYLOAD:
        raise ValueError("not the expected weights")


def test_fetch_without_a_known_checksum_trusts_on_first_use_and_checks_every_later_load(
    server, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", server.url("/mirror/"))
    monkeypatch.delenv(pin_variable(_released()), raising=False)
    # an interrupted first download resumes
    server.cut_next_response_at = 300_000
    with pytest.raises(DownloadError, match="call again to resume"):
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path", verify=_payload_only)
    path = fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path", verify=_payload_only)
    assert server.requests[-1]["range"] == "bytes=300000-"
    assert path.read_bytes() == PAYLOAD
    record = tmp_path / "weights" / "file.bin.sha256"
    assert record.read_text().strip() == PAYLOAD_SHA256
    err = capsys.readouterr().err
    assert PAYLOAD_SHA256 in err and f"{pin_variable(_released())}={PAYLOAD_SHA256}" in err

    # later loads use the cache and check it against the record
    requests = len(server.requests)
    assert fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path") == path
    assert len(server.requests) == requests
    path.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(DownloadError, match="changed since it was downloaded"):
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path")

    # a file put in the cache by hand is used as is, and recorded
    path.unlink()
    record.unlink()
    path.write_bytes(b"user supplied")
    assert fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path").read_bytes() == (
        b"user supplied"
    )
    assert record.read_text().strip() == hashlib.sha256(b"user supplied").hexdigest()


def test_a_download_that_fails_its_structure_check_is_deleted(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", server.url("/mirror/"))

    def refuse(path):
        raise ValueError("missing keys ['encoder.w']")

    with pytest.raises(DownloadError, match=r"does not hold the expected file \(missing keys") as raised:
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path", verify=refuse)
    assert "weights_path=" in str(raised.value)
    assert not (tmp_path / "weights" / "file.bin").exists() and not (tmp_path / "weights" / "file.bin.part").exists()
    assert not (tmp_path / "weights" / "file.bin.sha256").exists()


def test_a_pinned_sha256_is_enforced(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", server.url("/mirror/"))
    variable = pin_variable(_released())
    assert variable == "DALLE_PYTORCH_SHA256_WEIGHTS_FILE_BIN"
    monkeypatch.setenv(variable, "0" * 64)
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path")
    assert not (tmp_path / "weights" / "file.bin").exists()
    monkeypatch.setenv(variable, PAYLOAD_SHA256)
    path = fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path")
    assert path.read_bytes() == PAYLOAD
    # a pin given as an argument wins, and is checked against the cached file too
    with pytest.raises(DownloadError, match=f"sha256= pins {'1' * 64}"):
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path", sha256="1" * 64)
    monkeypatch.setenv(variable, "not a hash")
    with pytest.raises(ValueError, match=variable):
        fetch_released_file(_released(sha256=None), tmp_path, argument="weights_path")


def test_the_cli_names_its_flag_when_a_released_vae_cannot_be_had(server, tmp_path, monkeypatch, capsys):
    from dalle_pytorch.cli import train_dalle

    monkeypatch.setenv("DALLE_PYTORCH_BASE_URL", server.url("/mirror/"))  # serves bytes that are no dVAE
    monkeypatch.setenv("DALLE_PYTORCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        train_dalle.main(["--image_text_folder", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                          "--device", "cpu"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "does not hold the expected file" in err and "--openai_encoder_path PATH" in err
    assert "encoder_path=" not in err
    assert not list((tmp_path / "cache").rglob("*.pkl"))  # nothing unverified kept


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
