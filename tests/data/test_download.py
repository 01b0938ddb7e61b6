"""fetch_files / locate_files against a real HTTP server on 127.0.0.1 that honours Range and can cut bodies."""

from __future__ import annotations

import hashlib
import http.server
import random
import socket
import threading

import pytest

from distml.core.errors import DistmlError
from distml.data import download
from distml.data.download import RemoteFile, fetch_files, locate_files, verify_file

A = random.Random(1).randbytes(300_000)
B = random.Random(2).randbytes(200_000)


def entry(name: str, data: bytes) -> RemoteFile:
    return RemoteFile(name, len(data), hashlib.md5(data).hexdigest())


TABLE = [entry("a.bin", A), entry("b.bin", B)]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files under /files/; honours `Range: bytes=N-` unless told not to; can cut bodies short."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
            number = len(srv.requests)
        name = self.path.removeprefix("/files/") if self.path.startswith("/files/") else None
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not srv.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if number <= srv.cut_requests:
            body = body[: srv.cut_after]  # then the connection closes short of Content-Length
        self.wfile.write(body)
        self.wfile.flush()


class FileServer:
    def __init__(self, files: dict[str, bytes]):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.files = files
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.httpd.cut_requests = 0
        self.httpd.cut_after = 0
        self.httpd.ignore_range = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    @property
    def url(self) -> str:
        return self.root + "files/"

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.httpd.requests

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    srv = FileServer({"a.bin": A, "b.bin": B})
    yield srv
    srv.close()


def test_downloads_verifies_and_reuses(tmp_path, server):
    dest = tmp_path / "dl"
    paths = fetch_files(TABLE, dest, [server.url], progress=False)
    assert paths == {"a.bin": dest / "a.bin", "b.bin": dest / "b.bin"}
    assert (dest / "a.bin").read_bytes() == A and (dest / "b.bin").read_bytes() == B
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin", "b.bin"]  # no .part left
    assert [path for path, _ in server.requests] == ["/files/a.bin", "/files/b.bin"]

    again = fetch_files(TABLE, dest, [server.url], progress=False)
    assert again == paths
    assert len(server.requests) == 2  # nothing fetched the second time


def test_resumes_with_range_after_cut(tmp_path, server):
    server.httpd.cut_requests, server.httpd.cut_after = 1, 100_000
    fetch_files(TABLE[:1], tmp_path, [server.url], progress=False, backoff=0)
    assert server.requests == [("/files/a.bin", None), ("/files/a.bin", "bytes=100000-")]
    assert (tmp_path / "a.bin").read_bytes() == A
    assert not (tmp_path / "a.bin.part").exists()


def test_server_ignoring_range_still_gives_correct_file(tmp_path, server):
    server.httpd.cut_requests, server.httpd.cut_after = 1, 100_000
    server.httpd.ignore_range = True
    fetch_files(TABLE[:1], tmp_path, [server.url], progress=False, backoff=0)
    assert server.requests == [("/files/a.bin", None), ("/files/a.bin", "bytes=100000-")]  # answered 200
    assert (tmp_path / "a.bin").read_bytes() == A


def test_md5_mismatch_leaves_no_bad_file_and_keeps_good_ones(tmp_path, server):
    fetch_files(TABLE[:1], tmp_path, [server.url], progress=False)
    server.httpd.files["b.bin"] = random.Random(3).randbytes(len(B))  # same size, other bytes
    with pytest.raises(DistmlError) as info:
        fetch_files(TABLE, tmp_path, [server.url], progress=False, backoff=0)
    message = str(info.value)
    assert "b.bin" in message and TABLE[1].md5 in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert (tmp_path / "a.bin").read_bytes() == A
    assert [path for path, _ in server.requests] == ["/files/a.bin", "/files/b.bin"]  # a kept, b not retried


def test_offline_names_missing_files_folder_and_data_dir(tmp_path):
    dest = tmp_path / "dl"
    # Bound for the whole test but never listening: connections are refused, and no other process
    # (another xdist worker) can take the port meanwhile.
    with socket.socket() as held, pytest.raises(DistmlError) as info:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        fetch_files(TABLE, dest, [f"http://127.0.0.1:{port}/"], retries=1, backoff=0, progress=False)
    message = str(info.value)
    for remote in TABLE:
        assert remote.name in message and remote.md5 in message and str(remote.size) in message
    assert str(dest) in message and "--data-dir" in message and "failed" in message
    assert list(dest.iterdir()) == []


def test_falls_back_to_next_base_url(tmp_path, server):
    fetch_files(TABLE[:1], tmp_path, [server.root + "nothing/", server.url], progress=False, backoff=0)
    assert [path for path, _ in server.requests] == ["/nothing/a.bin", "/files/a.bin"]  # 404 is not retried
    assert (tmp_path / "a.bin").read_bytes() == A


def test_stale_part_from_earlier_run_is_replaced(tmp_path, server):
    (tmp_path / "a.bin.part").write_bytes(b"x" * 50_000)  # not a prefix of A
    fetch_files(TABLE[:1], tmp_path, [server.url], progress=False, backoff=0)
    assert server.requests == [("/files/a.bin", "bytes=50000-"), ("/files/a.bin", None)]
    assert (tmp_path / "a.bin").read_bytes() == A


def test_bad_final_file_is_downloaded_again(tmp_path, server):
    (tmp_path / "a.bin").write_bytes(A[:1000])
    fetch_files(TABLE[:1], tmp_path, [server.url], progress=False)
    assert (tmp_path / "a.bin").read_bytes() == A


def test_progress_plain_and_rich(tmp_path, server, capsys, monkeypatch):
    fetch_files(TABLE[:1], tmp_path / "plain", [server.url], progress=True)
    assert "downloading a.bin (300000 bytes)" in capsys.readouterr().err
    monkeypatch.setattr(download, "_stderr_is_terminal", lambda: True)
    server.httpd.cut_requests, server.httpd.cut_after = len(server.requests) + 1, 100_000
    fetch_files(TABLE[:1], tmp_path / "rich", [server.url], progress=True, backoff=0)
    assert (tmp_path / "rich" / "a.bin").read_bytes() == A


def test_locate_files_good_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(A)
    (tmp_path / "b.bin").write_bytes(B)
    assert locate_files(TABLE, tmp_path) == {"a.bin": tmp_path / "a.bin", "b.bin": tmp_path / "b.bin"}


def test_locate_files_names_every_problem_at_once(tmp_path):
    (tmp_path / "a.bin").write_bytes(A[:1234])
    with pytest.raises(DistmlError) as info:
        locate_files(TABLE, tmp_path)
    message = str(info.value)
    assert "a.bin" in message and "1234 bytes" in message and "b.bin" in message and "missing" in message
    for remote in TABLE:
        assert remote.md5 in message and str(remote.size) in message
    with pytest.raises(DistmlError, match="not a folder"):
        locate_files(TABLE, tmp_path / "nope")


def test_verify_file_reports_expected_and_found(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(A[: len(B)])
    with pytest.raises(DistmlError) as info:
        verify_file(path, TABLE[1])
    message = str(info.value)
    assert "b.bin" in message and TABLE[1].md5 in message and hashlib.md5(A[: len(B)]).hexdigest() in message
    path.write_bytes(B)
    verify_file(path, TABLE[1])
