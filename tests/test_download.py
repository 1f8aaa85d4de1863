"""Downloads end (issue 20): a server that never answers, answers slowly or sends a truncated body, against a
local HTTP server in a thread. A try is given up after the timeout, retried, and fails in one line with no
partial file; a slow server that keeps sending is fine."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from resnet_repro import download
from resnet_repro.download import DownloadError, fetch
from tests.conftest import train_args, write_cifar10

BODY = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.TIMEOUT_ENV, "1")
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)


@contextlib.contextmanager
def serving(body: bytes, *, pause: float = 0.0, cut: int | None = None, status: int = 200) -> Iterator[dict]:
    """An HTTP server in a thread answering every GET with `body` in 4 chunks `pause` s apart (only `cut`
    bytes of it, under the full Content-Length, when given); yields {"url": ..., "requests": count}."""
    seen = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen["requests"] += 1
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            sent = body[:cut] if cut is not None else body
            for i in range(4):
                self.wfile.write(sent[i * len(sent) // 4 : (i + 1) * len(sent) // 4])
                self.wfile.flush()
                time.sleep(pause)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "seen": seen}
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_server_that_never_answers_ends_the_test_command_in_one_line_without_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The issue's hang: `resnet_repro.test checkpoint=http://…` against a server that never answers."""
    import torch

    from resnet_repro import test as test_command

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    start = time.perf_counter()
    with silent() as url, pytest.raises(SystemExit) as stop:
        test_command.main(["row=resnet18_8xb16_cifar10", f"checkpoint={url}/r-abcdef12.pth", *train_args(tmp_path)])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no answer within 1 s, 3 tries" in lines[0] and "torch.hub's cache" in lines[0], lines
    assert time.perf_counter() - start < 60
    assert not [p for p in (tmp_path / "hub").rglob("*") if p.is_file()]  # no .partial, no cached file


def test_a_slow_server_that_keeps_sending_is_waited_for_and_the_checksum_holds(tmp_path: Path) -> None:
    sha = hashlib.sha256(BODY).hexdigest()
    with serving(BODY, pause=0.4) as server:  # 1.6 s in all, never 1 s silent
        path = fetch(f"{server['url']}/w.pth", tmp_path / "w.pth", checksum=("sha256", sha[:8]))
    assert path.read_bytes() == BODY and server["seen"]["requests"] == 1


def test_a_truncated_body_is_retried_then_refused_in_one_line_leaving_nothing(tmp_path: Path) -> None:
    with serving(BODY, cut=4000) as server, pytest.raises(DownloadError, match="IncompleteRead.*3 tries") as err:
        fetch(f"{server['url']}/w.pth", tmp_path / "w.pth")
    assert server["seen"]["requests"] == 3 and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_and_a_wrong_checksum_fail_at_once(tmp_path: Path) -> None:
    with serving(b"", status=404) as server, pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server['url']}/w.pth", tmp_path / "w.pth")
    assert server["seen"]["requests"] == 1
    with serving(BODY) as server, pytest.raises(DownloadError, match="sha256"):
        fetch(f"{server['url']}/w.pth", tmp_path / "w.pth", checksum=("sha256", "00000000"))
    assert server["seen"]["requests"] == 1 and list(tmp_path.iterdir()) == []


def test_the_cifar_download_checks_its_md5_extracts_and_a_failed_one_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet_repro.data import datasets

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(write_cifar10(tmp_path / "made") / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buffer.getvalue()
    release = datasets.CIFAR_RELEASES["cifar10"]  # torchvision's address and md5, patched for this test
    monkeypatch.setattr(release, "tgz_md5", hashlib.md5(archive).hexdigest())
    cfg = {"name": "cifar10", "format": "pickle", "root": str(tmp_path / "data" / "cifar10"), "download": True}
    with serving(archive, cut=100) as server:
        monkeypatch.setattr(release, "url", f"{server['url']}/cifar-10-python.tar.gz")
        with pytest.raises(datasets.DataError, match="IncompleteRead"):
            datasets.ensure_present(cfg)
    assert not (tmp_path / "data").exists()
    with serving(archive) as server:
        monkeypatch.setattr(release, "url", f"{server['url']}/cifar-10-python.tar.gz")
        datasets.ensure_present(cfg)
    assert len(datasets.data_source(cfg).load("test")) == 20
