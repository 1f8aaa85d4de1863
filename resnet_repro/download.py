"""Downloads that end: checkpoints into torch.hub's cache, dataset archives into the data folder.

Why our own: `torch.hub.download_url_to_file` and torchvision's `download_url` open the URL without a
timeout, so a server that accepts and never answers hangs the command for ever (and torch.hub leaves its
`.partial` file behind). This is urllib with a socket timeout (on connecting and on every read: a slow
server that keeps sending is fine, a silent one is given up), a retry or two for what may pass (timeouts,
refused or reset connections, truncated bodies, HTTP 5xx/408/429), a progress bar on a terminal (a log line
every 30 s otherwise), the checksum computed while streaming, and a temporary file beside the target that
is renamed only when complete and removed on any failure: the target exists whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from resnet_repro.errors import UserError

log = logging.getLogger("resnet_repro")
TIMEOUT_ENV = "RESNET_REPRO_DOWNLOAD_TIMEOUT"  # seconds without an answer before a try is given up
TIMEOUT_S = 30.0
RETRIES = 2  # tries after the first
BACKOFF_S = 1.0  # before the second try; doubled before each next
CHUNK = 1 << 20
LOG_EVERY_S = 30.0
TRANSIENT_HTTP = (408, 429)  # and every 5xx


class DownloadError(UserError):
    """A download that failed for good (after its retries): one line naming the URL and why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not download {url} ({reason})")
        self.url, self.reason = url, reason


class _Permanent(Exception):
    """A failure no retry can mend (404, a checksum that differs, a malformed URL)."""


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, TIMEOUT_S))
    except ValueError:
        return TIMEOUT_S


def fetch(url: str, target: str | Path, *, checksum: tuple[str, str] | None = None, retries: int = RETRIES) -> Path:
    """Download `url` to `target` (its folder is created); `checksum` = (hashlib name, expected hex digest or
    its start). A DownloadError after `retries` more tries; never a partial `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    reason = ""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, target, checksum, timeout_s())
            return target
        except _Permanent as err:
            raise DownloadError(url, str(err)) from None
        except (OSError, http.client.HTTPException) as err:  # timeouts, refusals, resets, truncation, 5xx
            reason = _reason(err)
            if attempt < retries:
                log.info("download of %s failed (%s); trying again (%d of %d)", url, reason, attempt + 2, retries + 1)
                time.sleep(BACKOFF_S * 2**attempt)
    raise DownloadError(url, f"{reason}, {retries + 1} tries")


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    inner = getattr(err, "reason", None) or err
    if isinstance(inner, TimeoutError):
        return f"no answer within {timeout_s():g} s"
    text = str(inner).strip().replace("\n", " ")
    return text or type(inner).__name__


def _fetch_once(url: str, target: Path, checksum: tuple[str, str] | None, timeout: float) -> None:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "resnet_repro"})
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the user's URL
    except urllib.error.HTTPError as err:
        if err.code < 500 and err.code not in TRANSIENT_HTTP:
            raise _Permanent(_reason(err)) from None
        raise
    except ValueError as err:  # not a URL urllib can open
        raise _Permanent(str(err)) from None
    digest = hashlib.new(checksum[0]) if checksum else None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with response, os.fdopen(fd, "wb") as out:
            size = _stream(response, out, digest, url, target)
            out.flush()
            os.fsync(out.fileno())
        expected = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        if expected is not None and expected.isdigit() and size != int(expected):
            raise http.client.IncompleteRead(b"", int(expected) - size)
        if digest is not None and not digest.hexdigest().startswith(checksum[1].lower()):
            raise _Permanent(f"its {checksum[0]} is {digest.hexdigest()[:16]}…, expected {checksum[1][:16]}…")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _stream(response: Any, out: BinaryIO, digest: Any, url: str, target: Path) -> int:
    """Copy the body, hashing and showing progress; the number of bytes."""
    headers = getattr(response, "headers", None)
    length = headers.get("Content-Length") if headers is not None else None
    total = int(length) if length and length.isdigit() else None
    size, last_log = 0, time.monotonic()
    log.info("downloading %s to %s", url, target)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False, disable=not sys.stderr.isatty())
    with bar:
        while chunk := response.read(CHUNK):
            out.write(chunk)
            if digest is not None:
                digest.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
            if time.monotonic() - last_log > LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("downloading %s: %.1f of %s MB", url, size / 1e6, f"{total / 1e6:.1f}" if total else "?")
    return size
