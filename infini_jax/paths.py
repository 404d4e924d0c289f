"""Paths: every workdir, checkpoint, data_dir and output dir is an `etils.epath.Path`, so gs:// works.

`resolve` is the one place a user's path string becomes a path object. It exists because epath's own
`.absolute()` turns `gs://bucket/run` into `<cwd>/gs:/bucket/run`: a URI is already absolute, and only a
relative local path gets the working directory (Orbax needs absolute local paths).

Writes to object stores have no append, so text files that grow (metrics.jsonl) are rewritten whole:
see `append_text`.
"""

from __future__ import annotations

import os

from etils import epath


def resolve(path: epath.PathLike) -> epath.Path:
    """An absolute epath.Path: `~` expanded; a relative local path made absolute; a URI left as it is."""
    p = epath.Path(os.fspath(path)).expanduser()
    return p if p.is_absolute() else p.absolute()


def is_local(path: epath.Path) -> bool:
    """Whether `path` is on this machine's file system (not gs://, s3://, ...)."""
    return "://" not in os.fspath(path)


def append_text(path: epath.Path, text: str) -> None:
    """Appends `text` to `path`. Local files are appended to; object stores (no append) get the whole file
    rewritten, which is fine for the small, rarely written logs this is used for."""
    if is_local(path):
        with path.open("a") as f:
            f.write(text)
    else:
        path.write_text((path.read_text() if path.exists() else "") + text)
