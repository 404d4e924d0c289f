"""Document sources: random-access sequences of (doc_id, text).

- ``DirectorySource(data_dir, split)``: .txt/.tex/.md files (one document per file) and .jsonl files (one
  document per line, field ``text_field``). Files come from ``data_dir/<split>/`` (searched recursively) when that
  folder exists, else from ``data_dir`` itself when it has no train/validation/test subfolders (a flat dir).
  Sorted by relative path; doc_id = relative path (``path:line`` for JSONL lines).
- ``PG19Source(data_dir, split)``: the tensorflow-datasets ``pg19`` ArrayRecord build, read without TensorFlow
  via ``tfds.data_source``. doc_id = book_id.
- ``build_pg19(source_dir, data_dir)``: builds that ArrayRecord dataset with TFDS's real pg19 builder from a
  folder in PG19's layout (metadata.csv + train/ validation/ test/ *.txt; default: DeepMind's gs://
  bucket). Needs tensorflow once. CLI:
  ``python -m infini_jax.data.documents build-pg19 --source DIR --data_dir OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterator

from etils import epath

from infini_jax import paths

SPLITS = ("train", "validation", "test")
TEXT_EXTENSIONS = (".txt", ".tex", ".md")
JSONL_EXTENSIONS = (".jsonl",)
PG19_GCS = "gs://deepmind-gutenberg"


class DocumentSource:
    """Base: __len__, __getitem__(i) -> (doc_id, text), iteration in order."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[str, str]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for i in range(len(self)):
            yield self[i]


def _read_text(path: epath.Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"file {str(path)!r} is not valid UTF-8 ({err}); convert or remove it") from err
    if not text.strip():
        raise ValueError(f"file {str(path)!r} is empty; remove it from the data directory")
    return text


def _check_dir(data_dir) -> epath.Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError("data_dir is not set; set config.data.data_dir to the folder holding the documents")
    path = paths.resolve(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"data_dir {str(path)!r} does not exist; set config.data.data_dir to an existing "
                                "folder")
    if not path.is_dir():
        raise FileNotFoundError(f"data_dir {str(path)!r} is not a directory; set config.data.data_dir to a folder")
    return path


class DirectorySource(DocumentSource):
    def __init__(self, data_dir, split: str | None = "train", *, text_field: str = "text",
                 extensions: tuple[str, ...] = TEXT_EXTENSIONS + JSONL_EXTENSIONS):
        self.text_field = text_field
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        single = paths.resolve(data_dir) if data_dir else None
        if single is not None and single.is_file() and single.suffix.lower() in exts:
            root = single.parent  # one file given directly: it is the whole dataset for every split
            present = []
        else:
            root = _check_dir(data_dir)
            present = [s for s in SPLITS if (root / s).is_dir()]
        if single is not None and single.is_file():
            base, files = root, [single]
        elif split and (root / split).is_dir():
            base = root / split
        elif not present:
            base = root  # flat directory: every split reads the same files
        else:
            raise ValueError(f"split {split!r} has no folder in {str(root)!r} (found splits: {present}); "
                             f"create {str(root / str(split))!r} or use one of {present}")
        if not (single is not None and single.is_file()):
            # walk, not rglob: epath refuses recursive globs on object stores
            files = sorted(top / name for top, _, names in base.walk() for name in names
                           if (top / name).suffix.lower() in exts)
        if not files:
            raise ValueError(f"no document files ({', '.join(exts)}) in {str(base)!r}"
                             + (f" for split {split!r}" if base != root else "")
                             + "; point config.data.data_dir at a folder of documents")
        self.base = base
        # index: (path, line offset in bytes or -1 for a whole-file document, doc_id)
        self._index: list[tuple[epath.Path, int, str]] = []
        for path in files:
            rel = str(path.relative_to(base))
            if path.suffix.lower() in JSONL_EXTENSIONS:
                n0 = len(self._index)
                offset = 0
                with path.open("rb") as f:
                    for lineno, line in enumerate(f, start=1):
                        if line.strip():
                            self._index.append((path, offset, f"{rel}:{lineno}"))
                        offset += len(line)
                if len(self._index) == n0:
                    raise ValueError(f"file {str(path)!r} is empty; remove it from the data directory")
            else:
                if path.stat().length == 0:
                    raise ValueError(f"file {str(path)!r} is empty; remove it from the data directory")
                self._index.append((path, -1, rel))

    def __len__(self) -> int:
        return len(self._index)

    def doc_id(self, i: int) -> str:
        return self._index[i][2]

    def __getitem__(self, i: int) -> tuple[str, str]:
        path, offset, doc_id = self._index[i]
        if offset < 0:
            return doc_id, _read_text(path)
        return doc_id, text_field(read_jsonl_record(path, offset, doc_id), self.text_field, doc_id, path)

    def read_record(self, i: int) -> dict:
        """The whole JSON object of a JSONL document (for sources with several fields, e.g. BookSum)."""
        path, offset, doc_id = self._index[i]
        if offset < 0:
            raise ValueError(f"{str(path)!r} is not a JSONL file")
        return read_jsonl_record(path, offset, doc_id)


def read_jsonl_record(path: epath.Path, offset: int, doc_id: str) -> dict:
    with path.open("rb") as f:
        f.seek(offset)
        line = f.readline()
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot decode JSON document {doc_id!r} in {str(path)!r}: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"JSON document {doc_id!r} in {str(path)!r} is not an object")
    return record


def text_field(record: dict, field: str, doc_id: str, path) -> str:
    if field not in record:
        raise ValueError(f"JSON document {doc_id!r} in {str(path)!r} has no field {field!r} "
                         f"(fields: {sorted(record)}); set the field name in config.data")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} of {doc_id!r} in {str(path)!r} is not a string")
    return value


class PG19Source(DocumentSource):
    """PG19 from an ArrayRecord TFDS build (see build_pg19); read without TensorFlow."""

    def __init__(self, data_dir, split: str = "train"):
        root = _check_dir(data_dir)
        if not (root / "pg19").is_dir():
            raise FileNotFoundError(
                f"no tensorflow-datasets 'pg19' build in {str(root)!r}; build it with "
                f"`python -m infini_jax.data.documents build-pg19 --source <PG19 folder or {PG19_GCS}> "
                f"--data_dir {root}`")
        import tensorflow_datasets as tfds

        try:
            self._ds = tfds.data_source("pg19", data_dir=str(root), split=split)
        except Exception as err:
            raise ValueError(f"cannot open pg19 split {split!r} in {str(root)!r}: {err}") from err
        if len(self._ds) == 0:
            raise ValueError(f"pg19 split {split!r} in {str(root)!r} has no books")
        self.split = split

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> tuple[str, str]:
        record = self._ds[int(i)]
        text = record["book_text"]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return str(int(record["book_id"])), text


def build_pg19(source_dir: str, data_dir: str) -> dict[str, int]:
    """Build tfds 'pg19' (file_format='array_record') from a PG19-layout folder; returns books per split.

    Uses TFDS's real builder with its module-level ``_DATA_DIR`` pointed at ``source_dir`` (as TFDS's own
    test does). Needs tensorflow (tensorflow-cpu) for this one step; reading afterwards does not.
    """
    src = paths.resolve(source_dir)
    missing = [n for n in ("metadata.csv", *SPLITS) if not (src / n).exists()]
    if missing:
        raise FileNotFoundError(f"{str(src)!r} is not a PG19-layout folder: missing {missing} "
                                "(expected metadata.csv and train/ validation/ test/ folders of <id>.txt)")
    source_dir = os.fspath(src)
    try:
        import tensorflow  # noqa: F401  (the pg19 builder reads through tf.io.gfile)
    except ImportError as err:
        raise ImportError("building pg19 needs tensorflow once: pip install 'infini-jax[tfds]' "
                          "(tensorflow-cpu); reading the build afterwards does not") from err
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.pg19 import pg19_dataset_builder

    old = pg19_dataset_builder._DATA_DIR
    pg19_dataset_builder._DATA_DIR = source_dir
    try:
        builder = pg19_dataset_builder.Builder(data_dir=os.fspath(paths.resolve(data_dir)),
                                               file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    finally:
        pg19_dataset_builder._DATA_DIR = old
    return {name: int(info.num_examples) for name, info in builder.info.splits.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infini_jax.data.documents")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-pg19", help="build tfds pg19 (ArrayRecord) from a PG19-layout folder")
    b.add_argument("--source", default=PG19_GCS, help=f"PG19-layout folder (default {PG19_GCS})")
    b.add_argument("--data_dir", required=True, help="tensorflow-datasets data_dir to build into")
    args = parser.parse_args(argv)
    counts = build_pg19(args.source, args.data_dir)
    print(json.dumps({"data_dir": args.data_dir, "splits": counts}))


if __name__ == "__main__":
    main()
