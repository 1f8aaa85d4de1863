"""Where the MLflow store is and how to talk to it: URIs, the SQLite file path, retries while SQLite is locked."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
MAX_WAIT_S = 120.0
SQLITE = "sqlite:///"
NO_TRACKING = "none"  # tracking.uri=none: no store; nothing is tracked and MLflow is never imported


def sqlite_path(uri: str) -> Path | None:
    """The database file of an `sqlite:///` URI (relative paths against the cwd); None for other stores."""
    return Path(uri[len(SQLITE) :]).resolve() if uri.startswith(SQLITE) else None


def default_uri() -> str:
    return f"{SQLITE}{Path.cwd().resolve() / 'mlflow.db'}"


def tracking_off(uri: str | None) -> bool:
    return isinstance(uri, str) and uri.lower() == NO_TRACKING


def resolve_uri(uri: str | None) -> str:
    """None -> the default store; a relative sqlite path -> absolute, so every job writes to one file."""
    if not uri:
        return default_uri()
    if tracking_off(uri):
        return NO_TRACKING
    db = sqlite_path(uri)
    return f"{SQLITE}{db}" if db is not None else uri


# the URI schemes MLflow has tracking stores for (its registry, plus SQLAlchemy dialects like postgresql+psycopg2)
SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
URI_FORMS = "sqlite:///<file in an existing folder>, file:<folder>, http(s)://<server>:<port>, none (no tracking)"


def uri_problem(uri: str | None) -> str | None:
    """What is wrong with the form of a tracking URI, without opening it; None when it may name a store.
    (MLflow would create the folders of a SQLite path that does not exist: a typo would start a new store.)"""
    uri = resolve_uri(uri)
    if uri == NO_TRACKING:
        return None
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if scheme not in SCHEMES:
        return f"has no MLflow store scheme ({scheme!r})"
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        return f"is in a folder that does not exist ({db.parent}); create it first"
    return None


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


def _transient(err: Exception) -> bool:
    text = str(err).lower()
    return "database is locked" in text or "database table is locked" in text or "unable to open database" in text


def retrying(fn: Callable[..., T], max_wait: float | None = None) -> Callable[..., T]:
    """Retry an MLflow call while SQLite is locked by a parallel job (back-off up to `max_wait`, MAX_WAIT_S)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        delay, waited = 0.05, 0.0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if not _transient(err) or waited > (MAX_WAIT_S if max_wait is None else max_wait):
                    raise
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 2.0)

    return wrapper


# the first request to a server: one try, a short wait (MLflow's defaults retry for minutes)
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def mlflow_quiet() -> Iterator[None]:
    """MLflow logs a traceback (level ERROR) for a failed database call before raising it, urllib3 a line per
    HTTP retry: the caller reports the failure in one line instead."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "urllib3")]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def mlflow_environ(values: dict[str, str]) -> Iterator[None]:
    """MLflow's settings are environment variables, read at each call: set some for the calls inside."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
