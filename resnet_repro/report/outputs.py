"""Writing the report's files: only the bytes that changed, and the README only between its markers.

Nothing in the outputs depends on when the report ran, and an unchanged file is not rewritten, so a
second call on the same runs changes no byte and no mtime.
"""

from __future__ import annotations

from pathlib import Path

from resnet_repro.errors import UserError

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def changes(path: Path, data: bytes) -> bool:
    return not (path.is_file() and path.read_bytes() == data)


def write_if_changed(path: Path, data: bytes, what: str = "", flag: str = "--out") -> bool:
    """Write only when the bytes differ, so an unchanged store leaves every file (and its mtime) alone.

    A failure is a one-line UserError naming `what` was written (default: the path) and the `flag` that moves it.
    """
    if not changes(path, data):
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as err:
        raise UserError(
            f"cannot write {what or path} ({err.strerror or err}: {err.filename or path}); give a folder this "
            f"process can write with {flag}"
        ) from None
    return True


def has_markers(text: str) -> bool:
    start, end = text.find(BEGIN), text.find(END)
    return 0 <= start < end


def replace_section(text: str, content: str, name: str) -> str:
    """The README with everything between the markers replaced by `content`."""
    if not has_markers(text):
        raise UserError(f"{name} has no results section: add the lines {BEGIN} and {END} (in this order)")
    start, end = text.find(BEGIN), text.find(END)
    return text[: start + len(BEGIN)] + "\n" + content + text[end:]


def readme_path(given: str | None, disabled: bool) -> Path | None:
    """The README to update: `given` (it must exist and have the markers), else ./README.md when it has them.

    Run outside the repository (no README.md with the markers here), the report writes results/ only.
    """
    if disabled:
        return None
    if given is None:
        here = Path("README.md")
        return here if here.is_file() and has_markers(here.read_text(encoding="utf-8")) else None
    path = Path(given)
    if not path.is_file():
        raise UserError(f"{path}: no such file (leave --readme out to write results/ only)")
    replace_section(path.read_text(encoding="utf-8"), "", str(path))  # fails early, before anything is written
    return path
