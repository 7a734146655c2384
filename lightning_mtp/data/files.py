"""Where records come from: local JSONL / Parquet / text files, a finished self-distillation job, a
``Dataset.save_to_disk`` directory, or a Hugging Face dataset by name.

Every source is read with Hugging Face ``datasets`` (memory-mapped Arrow, so corpora larger than memory
work, and parsed files are cached). A dataset named by Hub id is read from the local datasets cache when
the Hub cannot be reached: this module checks reachability first (one TCP connect, 3 s at most), because
``datasets`` itself retries an unreachable Hub for over 20 s (23 s measured) before giving up.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["DATA_FORMATS", "DISTILL_FORMAT", "load_source"]

DATA_FORMATS = ("auto", "json", "parquet", "text", "disk", "hub")
DISTILL_FORMAT = "lightning-mtp-distill"
"""The ``format`` key of a self-distillation job's ``manifest.json`` (see :mod:`lightning_mtp.data.distill`)."""

_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def load_source(
    source: str,
    *,
    split: str = "train",
    data_format: str = "auto",
    dataset_config: str | None = None,
    cache_dir: str | None = None,
    what: str = "data",
):
    """Read ``source`` into a ``datasets.Dataset``; raise ``ValueError`` naming the source when it cannot be read.

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
        raise ValueError(f"unknown data_format {data_format!r}; choose one of {list(DATA_FORMATS)}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"{what} must be a path, a glob or a Hugging Face dataset id, got {source!r}")
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
            raise ValueError(f"{what} directory {source!r} holds no .jsonl/.json/.parquet/.txt files")
    elif any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"no file matches {what} pattern {source!r}")
    elif path.is_file():
        files = [path]
    elif data_format in ("json", "parquet", "text", "disk") or _looks_local(source):
        raise ValueError(f"{what} file {source!r} does not exist")
    else:
        return _load_hub(source, split, dataset_config, cache_dir, what)
    kinds = {data_format} if data_format != "auto" else {_kind(p) for p in files}
    if None in kinds:
        bad = next(p for p in files if _kind(p) is None)
        raise ValueError(f"cannot tell the format of {what} file {str(bad)!r} from its suffix; "
                         f"pass data_format as one of {list(DATA_FORMATS[1:4])}")
    if len(kinds) > 1:
        raise ValueError(f"{what} {source!r} mixes file formats {sorted(kinds)}; give one kind of file")
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
        raise ValueError(f"{what}: {path / 'manifest.json'} is not valid JSON ({err})") from None
    if manifest.get("format") != DISTILL_FORMAT:
        raise ValueError(f"{what}: {path / 'manifest.json'} is not a lightning-mtp distill manifest")
    data = path / manifest.get("data_file", "data.jsonl")
    if not manifest.get("complete") or not data.is_file():
        raise ValueError(f"{what}: the distill job in {str(path)!r} is not finished "
                         f"({manifest.get('shards_done', '?')}/{manifest.get('num_shards', '?')} shards); "
                         "rerun the same `lightning-mtp distill` command to finish it")
    return data


def _load_files(files: list[Path], kind: str, cache_dir: str | None, source: str, what: str):
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"{what} file {str(f)!r} is empty: no records")
    kwargs = {"keep_linebreaks": False} if kind == "text" else {}
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise ValueError(f"could not read {what} {source!r} as {kind}: {type(cause).__name__}: {cause}") from None
    if kind == "text":
        ds = ds.filter(lambda t: bool(t.strip()), input_columns="text")
    if len(ds) == 0:
        raise ValueError(f"{what} {source!r} has no records")
    return ds


def _load_disk(path: Path, split: str, what: str):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{what} {str(path)!r} has no split {split!r}; its splits are {sorted(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise ValueError(f"{what} {str(path)!r} has no records")
    return ds


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
            raise ValueError(
                f"{what}: dataset {name!r} (split {split!r}) is not in the local datasets cache ({where}) and {why}. "
                f"Get it on a machine with network (python -c \"import datasets; datasets.load_dataset({name!r}, "
                f"split={split!r})\") and copy that cache here, or save it as JSONL/Parquet and pass the file"
            ) from None
        raise ValueError(f"{what}: dataset {name!r} could not be loaded: {err}") from None
    except ValueError as err:  # e.g. an unknown split or config: datasets names the valid ones
        raise ValueError(f"{what}: dataset {name!r}: {err}") from None
    if len(ds) == 0:
        raise ValueError(f"{what}: dataset {name!r} split {split!r} has no records")
    return ds


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
