"""Where records come from: local JSONL / Parquet / text files, a finished self-distillation job, a
``Dataset.save_to_disk`` directory, or a Hugging Face dataset by name.

Every source is read with Hugging Face ``datasets`` (memory-mapped Arrow, so corpora larger than memory
work, and parsed files are cached). A dataset named by Hub id is read from the local datasets cache when
the Hub cannot be reached: this module checks reachability first (one TCP connect, 3 s at most), because
``datasets`` itself retries an unreachable Hub for over 20 s (23 s measured) before giving up.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import glob
import gzip
import json
import lzma
import os
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import numpy as np

from lightning_mtp.errors import UserInputError

__all__ = ["DATA_FORMATS", "DISTILL_FORMAT", "ORIGIN_COLUMN", "RecordPlace", "load_source", "locate"]

DATA_FORMATS = ("auto", "json", "parquet", "text", "disk", "hub")
DISTILL_FORMAT = "lightning-mtp-distill"
"""The ``format`` key of a self-distillation job's ``manifest.json`` (see :mod:`lightning_mtp.data.distill`)."""

_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # .zst needs a package: its rows go unnamed

ORIGIN_COLUMN = "__lightning_mtp_origin__"
"""A column ``load_source`` adds to every source: where each record came from (see :func:`locate`). It survives
the shuffles, splits and selections done before tokenisation, so row errors can name the file and line."""
_ROW_BITS = 40  # an origin is (source key << 40) | row: 2**40 rows per source, 2**23 source keys
_SOURCES: dict[int, tuple[tuple[str, ...], str]] = {}  # source key -> (files in load order, kind), this process


def load_source(
    source: str,
    *,
    split: str = "train",
    data_format: str = "auto",
    dataset_config: str | None = None,
    cache_dir: str | None = None,
    what: str = "data",
):
    """Read ``source`` into a ``datasets.Dataset``; raise ``ValueError`` naming the source when it cannot be read
    (a malformed JSON Lines line by file and line number).

    The dataset has one column more than the data: :data:`ORIGIN_COLUMN` (8 bytes a row, in memory), from which
    :class:`RecordPlace` names a record's file and line in errors raised after shuffles and splits.

    Args:
        source: a file, a glob (``data/*.jsonl``), a directory (of data files, a finished ``lightning-mtp
            distill`` output, or a ``save_to_disk`` dataset), or a Hub dataset id (``meta-math/MetaMathQA``).
        split: the split to read from a Hub dataset or a saved ``DatasetDict`` (files have one split).
        data_format: ``auto`` (from the suffix, or a Hub id when no such path exists), ``json`` (JSON Lines),
            ``parquet``, ``text`` (one record per non-empty line, in field ``text``), ``disk``, ``hub``.
        dataset_config: the configuration (subset) of a Hub dataset.
        cache_dir: the ``datasets`` cache (default ``~/.cache/huggingface/datasets``).
        what: how error messages name this source (``"train data"``).
    """
    if data_format not in DATA_FORMATS:
        raise UserInputError(f"unknown data_format {data_format!r}; choose one of {list(DATA_FORMATS)}")
    if not isinstance(source, str) or not source:
        raise UserInputError(f"{what} must be a path, a glob or a Hugging Face dataset id, got {source!r}")
    if data_format == "hub":
        return _load_hub(source, split, dataset_config, cache_dir, what)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _load_files([_distill_output(path, what)], "json", cache_dir, source, what)
        if data_format == "disk" or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _load_disk(path, split, what)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None and not p.name.startswith("."))
        if not files:
            raise UserInputError(f"{what} directory {source!r} holds no .jsonl/.json/.parquet/.txt files")
    elif any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not files:
            raise UserInputError(f"no file matches {what} pattern {source!r}")
    elif path.is_file():
        files = [path]
    elif data_format in ("json", "parquet", "text", "disk") or _looks_local(source):
        raise UserInputError(f"{what} file {source!r} does not exist")
    else:
        return _load_hub(source, split, dataset_config, cache_dir, what)
    kinds = {data_format} if data_format != "auto" else {_kind(p) for p in files}
    if None in kinds:
        bad = next(p for p in files if _kind(p) is None)
        raise UserInputError(f"cannot tell the format of {what} file {str(bad)!r} from its suffix; "
                             f"pass data_format as one of {list(DATA_FORMATS[1:4])}")
    if len(kinds) > 1:
        raise UserInputError(f"{what} {source!r} mixes file formats {sorted(kinds)}; give one kind of file")
    return _load_files(files, kinds.pop(), cache_dir, source, what)


def _kind(path: Path) -> str | None:
    """``json`` / ``parquet`` / ``text`` from the suffix (``data.jsonl.gz`` is JSON Lines), None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def _looks_local(source: str) -> bool:
    """A Hub id is ``name`` or ``owner/name`` with no file suffix; anything else is meant as a local path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep + os.sep in source
            or _kind(Path(source)) is not None)


def _distill_output(path: Path, what: str) -> Path:
    """The data file of a finished self-distillation job in ``path``; partial jobs are refused."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{what}: {path / 'manifest.json'} is not valid JSON ({err})") from None
    if manifest.get("format") != DISTILL_FORMAT:
        raise UserInputError(f"{what}: {path / 'manifest.json'} is not a lightning-mtp distill manifest")
    data = path / manifest.get("data_file", "data.jsonl")
    if not manifest.get("complete") or not data.is_file():
        raise UserInputError(f"{what}: the distill job in {str(path)!r} is not finished "
                             f"({manifest.get('shards_done', '?')}/{manifest.get('num_shards', '?')} shards); "
                             "rerun the same `lightning-mtp distill` command to finish it")
    return data


def _load_files(files: list[Path], kind: str, cache_dir: str | None, source: str, what: str):
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise UserInputError(f"{what} file {str(f)!r} is empty: no records")
    kwargs = {"keep_linebreaks": False} if kind == "text" else {}
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        bad = _first_bad_json_line(files) if kind == "json" else None
        if bad is not None:
            raise UserInputError(f"{what} {bad}") from None
        cause = err.__cause__ or err
        raise UserInputError(f"could not read {what} {source!r} as {kind}: {type(cause).__name__}: {cause}") from None
    ds = _with_origin(ds, tuple(str(f) for f in files), kind)
    if kind == "text":  # after the origin: a text row's index is its line's, blank lines included
        ds = ds.filter(lambda t: bool(t.strip()), input_columns="text")
    if len(ds) == 0:
        raise UserInputError(f"{what} {source!r} has no records")
    return ds


def _load_disk(path: Path, split: str, what: str):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserInputError(f"{what} {str(path)!r} has no split {split!r}; its splits are {sorted(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise UserInputError(f"{what} {str(path)!r} has no records")
    return _with_origin(ds, (), "disk")


def _load_hub(name: str, split: str, config: str | None, cache_dir: str | None, what: str):
    import datasets
    import huggingface_hub.constants

    offline = huggingface_hub.constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE
    forced = not offline and not _hub_reachable(datasets.config.HF_ENDPOINT)
    where = cache_dir or datasets.config.HF_DATASETS_CACHE
    try:
        with _hub_offline(forced), _quiet_datasets():
            ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if offline or forced:
            why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "the Hub cannot be reached"
            raise UserInputError(
                f"{what}: dataset {name!r} (split {split!r}) is not in the local datasets cache ({where}) and {why}. "
                f"Get it on a machine with network (python -c \"import datasets; datasets.load_dataset({name!r}, "
                f"split={split!r})\") and copy that cache here, or save it as JSONL/Parquet and pass the file"
            ) from None
        raise UserInputError(f"{what}: dataset {name!r} could not be loaded: {err}") from None
    except ValueError as err:  # e.g. an unknown split or config: datasets names the valid ones
        raise UserInputError(f"{what}: dataset {name!r}: {err}") from None
    if len(ds) == 0:
        raise UserInputError(f"{what}: dataset {name!r} split {split!r} has no records")
    return _with_origin(ds, (), "hub")


# ---------------------------------------------------------------------------------------------- record origins
def _with_origin(ds, files: tuple[str, ...], kind: str):
    """``ds`` with :data:`ORIGIN_COLUMN`: its source's key (0 for a Hub or saved dataset) and each row's index."""
    key = 0
    if files:  # deterministic, so that the column (and the datasets cache fingerprints after it) is the same each run
        key = zlib.crc32("\n".join((kind, *files)).encode()) % ((1 << 23) - 1) + 1
        _SOURCES[key] = (files, kind)
    if ORIGIN_COLUMN in ds.column_names:  # a dataset saved after passing through here: its origins are stale
        ds = ds.remove_columns(ORIGIN_COLUMN)
    return ds.add_column(ORIGIN_COLUMN, np.arange(len(ds), dtype=np.int64) + (key << _ROW_BITS))


def locate(origin: int | None) -> str | None:
    """Where the record with ``origin`` (its :data:`ORIGIN_COLUMN` value) came from: ``"data/train.jsonl line 7"``
    (JSON Lines and text, 1-based) or ``"data/part-0.parquet row 7"``; None when no file is known (a Hub or saved
    dataset, a source loaded by another process, a compressed format Python cannot read)."""
    if origin is None:
        return None
    key, row = origin >> _ROW_BITS, origin & ((1 << _ROW_BITS) - 1)
    if key not in _SOURCES:
        return None
    files, kind = _SOURCES[key]
    if any(f.endswith(".zst") for f in files):
        return None
    for path in files:  # counted only now, for an error message: loading never reads the files twice
        for unit, number in _records(path, kind):
            if row == 0:
                return f"{path} {unit} {number}"
            row -= 1
    return None


class RecordPlace:
    """A record's place for error messages (``f"{place} has no 'response'"``), worked out only when formatted:
    finding a line may read the files, which no record that is fine should pay for.

    Args:
        origin: the record's :data:`ORIGIN_COLUMN` value, or None.
        source: how messages name the data (``"train data 'x.jsonl'"``), for rows of a source without files.
        fallback: the place when the origin names none (``"row 3 of distill data (list)"``).
    """

    def __init__(self, origin: int | None, source: str | None, fallback: str) -> None:
        self.origin, self.source, self.fallback = origin, source, fallback

    def __str__(self) -> str:
        place = locate(self.origin)
        if place is not None:
            return place
        if self.origin is not None and self.origin >> _ROW_BITS == 0 and self.source:
            return f"row {(self.origin & ((1 << _ROW_BITS) - 1)) + 1} of {self.source}"
        return self.fallback


def _records(path: str, kind: str) -> Iterator[tuple[str, int]]:
    """``("line", n)`` or ``("row", n)`` for each record of a data file, in the order ``datasets`` reads them."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from (("row", n) for n in range(1, pq.ParquetFile(path).metadata.num_rows + 1))
        return
    with _open_text(path) as f:
        if kind == "json" and _is_json_array(f):
            yield from (("row", n) for n in range(1, len(json.load(f)) + 1))
            return
        for n, line in enumerate(f, 1):
            if kind == "text" or line.strip():  # datasets skips blank lines of JSON Lines; text keeps them (see above)
                yield "line", n


def _first_bad_json_line(files: list[Path]) -> str | None:
    """``"PATH line N: why"`` for the first line of the JSON Lines ``files`` that is not one JSON object, else None."""
    for path in files:
        if path.suffix == ".zst":
            continue
        with _open_text(path) as f:
            if _is_json_array(f):
                continue
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))  # columns as an editor counts them
                except json.JSONDecodeError as err:
                    if n == 1 and _is_json_document(path):
                        break  # one (pretty-printed) JSON document, not JSON Lines: its error is datasets' to tell
                    return f"{path} line {n}: not valid JSON ({err.msg} at column {err.colno})"
                if not isinstance(value, dict):
                    return f"{path} line {n}: not a JSON object ({{...}}) but {_json_kind(value)}: {line.strip()[:60]}"
    return None


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null")


def _open_text(path: str | Path) -> IO[str]:
    opener = _OPENERS.get(Path(path).suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _is_json_array(f: IO[str]) -> bool:
    """Does the open file hold one JSON array (rather than JSON Lines)? Leaves ``f`` at its start."""
    head = f.read(4096).lstrip()
    f.seek(0)
    return head.startswith("[")


def _is_json_document(path: Path) -> bool:
    with _open_text(path) as f:
        try:
            json.load(f)
        except json.JSONDecodeError:
            return False
    return True


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub endpoint. Behind a proxy we cannot tell, and let ``datasets`` try."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Switch ``datasets`` and ``huggingface_hub`` to offline mode for one call: read from the cache, no retries.

    Both libraries read their offline flag from a module attribute at call time (set from the
    environment at import), so this is what ``HF_HUB_OFFLINE=1`` would do for the duration of the call.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Keep ``datasets``' own log lines (``Generating train split``) out of the output; errors still raise."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
