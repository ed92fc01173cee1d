"""Datasets: MNIST and Fashion-MNIST from their original gzipped IDX files, generated sets.

Every dataset is registered in :data:`simulator.core.registry.DATASETS` (a user's plugin file
adds its own with :func:`register_dataset`). IDX datasets are files:

Files are looked up in an explicit ``data_dir``, then ``$LEAKSIM_DATA_DIR``, then a per-user
cache, each laid out as ``<dir>/<dataset-name>/<file>``; every file is MD5-checked before use.
Missing files are downloaded from the official mirrors into the first of those locations.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch

from simulator.core.registry import DATASETS

__all__ = [
    "IDX_DATASETS",
    "DataError",
    "DataNotFoundError",
    "DatasetInfo",
    "FileInfo",
    "GeneratedDataset",
    "candidate_dirs",
    "data_folder",
    "ensure_files",
    "load_split",
    "md5sum",
    "read_idx",
    "red_blue",
    "register_dataset",
    "to_tensor",
]

log = logging.getLogger(__name__)

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
DEFAULT_TIMEOUT = 30.0


DATA_DIR_ENV = "LEAKSIM_DATA_DIR"  # where the dataset files are, for every process


class DataError(RuntimeError):
    """A dataset file is unknown, unreadable or not what it claims to be."""


class DataNotFoundError(DataError):
    """The dataset files are in none of the searched directories and could not be downloaded.

    ``missing`` names the files and ``target`` the folder they belong in (for one-line reports).
    """

    def __init__(self, message: str, missing: Sequence[str] = (), target: Path | None = None):
        super().__init__(message)
        self.missing = tuple(missing)
        self.target = target


@dataclass(frozen=True)
class FileInfo:
    """One distribution file and the checksum that identifies it."""

    name: str
    md5: str
    size: int


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset: its files (keyed ``<split>-<images|labels>``) and where to download them."""

    name: str
    description: str
    files: dict[str, FileInfo]
    mirrors: tuple[str, ...]
    shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10


@dataclass(frozen=True)
class GeneratedDataset:
    """A dataset built in memory: ``build()`` returns uint8 images (N, C, H, W) and int64
    labels (N,); its test split is the same images (the toy sets of dataset reconstruction)."""

    name: str
    description: str
    build: Callable[[], tuple[np.ndarray, np.ndarray]]
    shape: tuple[int, int, int]
    num_classes: int = 10


def register_dataset(dataset: DatasetInfo | GeneratedDataset) -> DatasetInfo | GeneratedDataset:
    """Make ``dataset`` usable as ``data.dataset`` in scenario files (plugin files too)."""
    DATASETS.add(dataset.name, dataset.description, dataset)
    return dataset


def _files(sizes_md5s: dict[str, tuple[int, str]]) -> dict[str, FileInfo]:
    names = {
        "train-images": "train-images-idx3-ubyte.gz",
        "train-labels": "train-labels-idx1-ubyte.gz",
        "test-images": "t10k-images-idx3-ubyte.gz",
        "test-labels": "t10k-labels-idx1-ubyte.gz",
    }
    return {key: FileInfo(names[key], md5, size) for key, (size, md5) in sizes_md5s.items()}


IDX_DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        description="MNIST handwritten digits, 28x28 grey, 10 classes, 60,000 train / 10,000 test",
        files=_files(
            {
                "train-images": (9_912_422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                "train-labels": (28_881, "d53e105ee54ea40749a09fcbcd1e9432"),
                "test-images": (1_648_877, "9fb629c4189551a2d022fa330f9573f3"),
                "test-labels": (4_542, "ec29112dd5afa0611ce80d1b7f02629c"),
            }
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        description="Zalando Fashion-MNIST clothing, 28x28 grey, 10 classes, 60,000 / 10,000",
        files=_files(
            {
                "train-images": (26_421_880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                "train-labels": (29_515, "25c81989df183df01b3e8a0aad5dffbe"),
                "test-images": (4_422_102, "bef4ecab320f06d8554ea6380940ec79"),
                "test-labels": (5_148, "bb300cfdad3c16e7a12a480ee83cd310"),
            }
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
}


RED_BLUE_SIZE = 16  # the smallest power of two on which the 11x11 SSIM window fits


def red_blue(per_class: int = 10, size: int = RED_BLUE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` all-red then ``per_class`` all-blue uint8 (3, size, size) images; red = 1.

    The toy set of Haim et al. 2022; as a dataset its test split is the same 20 images.
    """
    images = np.zeros((2 * per_class, 3, size, size), dtype=np.uint8)
    images[:per_class, 0] = 255
    images[per_class:, 2] = 255
    labels = np.concatenate([np.ones(per_class), np.zeros(per_class)]).astype(np.int64)
    return images, labels


for _info in IDX_DATASETS.values():
    register_dataset(_info)
register_dataset(
    GeneratedDataset(
        "red-blue",
        "20 all-red and all-blue 16x16 RGB images, red = 1 (the toy set of Haim et al. 2022)",
        red_blue,
        (3, RED_BLUE_SIZE, RED_BLUE_SIZE),
    )
)


def _entry(name: str) -> DatasetInfo | GeneratedDataset:
    try:
        return DATASETS.entry(name).value  # type: ignore[no-any-return]
    except ValueError:
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def _dataset(name: str) -> DatasetInfo:
    """The IDX files of dataset ``name`` (DataError for a generated or unknown one)."""
    info = _entry(name)
    if not isinstance(info, DatasetInfo):
        raise DataError(f"dataset {name!r} is generated, not read from files")
    return info


# --- reading -------------------------------------------------------------------------------


def _read_exact(f: BinaryIO, buf: memoryview) -> int:
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzipped IDX file: images (magic 2051) as uint8 (N, rows, cols), labels (2049) as
    uint8 (N,). Raises DataError naming the file if the header and the payload disagree."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4)
            magic = int.from_bytes(header, "big")
            ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}.get(magic, 0)
            if len(header) < 4 or not ndim:
                raise DataError(
                    f"{path}: not an MNIST IDX file: magic number {magic} "
                    f"(expected {IMAGES_MAGIC} for images or {LABELS_MAGIC} for labels)"
                )
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) != 4 * ndim:
                raise DataError(f"{path}: IDX header truncated")
            dims = tuple(int.from_bytes(dims_raw[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
            # Read straight into the result (no intermediate bytes copy): train images are 47 MB.
            out = np.empty(dims, dtype=np.uint8)
            got = _read_exact(f, memoryview(out.reshape(-1)))
            trailing = len(f.read(1 << 16)) if got == out.size else 0
    except (OSError, EOFError, zlib.error, MemoryError) as e:  # MemoryError: absurd header dims
        raise DataError(f"{path}: cannot read as a gzipped IDX file: {e}") from e
    if got != out.size or trailing:
        shape = "x".join(map(str, dims))
        held = f"{got}" if got != out.size else f"more than {got}"
        raise DataError(
            f"{path}: header declares {shape} = {out.size} data bytes but the file holds {held}"
        )
    return out


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks so large files do not sit in memory."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# (resolved path, mtime_ns, size) -> md5: clients call load_split often; hash each file once.
_md5_cache: dict[tuple[str, int, int], str] = {}
# Files the driver verified before the run, handed to the clients' processes (Ray workers
# inherit the environment) so that each file is hashed once per run, not once per client.
VERIFIED_ENV = "LEAKSIM_VERIFIED_FILES"


def share_verified() -> None:
    """Publish this process's verified files to the processes it starts (the clients)."""
    verified = [[path, mtime, size, md5] for (path, mtime, size), md5 in _md5_cache.items()]
    os.environ[VERIFIED_ENV] = json.dumps(verified)


def _shared_md5(key: tuple[str, int, int]) -> str | None:
    for path, mtime, size, md5 in json.loads(os.environ.get(VERIFIED_ENV, "[]")):
        if (path, mtime, size) == key:
            return str(md5)
    return None


def _verify(path: Path, info: FileInfo) -> str | None:
    """None if ``path`` is the expected file, else why not."""
    try:
        st = path.stat()
    except OSError:
        return f"{path}: missing"
    if st.st_size != info.size:
        return f"{path}: {st.st_size} bytes, expected {info.size}"
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _md5_cache:
        _md5_cache[key] = _shared_md5(key) or md5sum(path)
    if _md5_cache[key] != info.md5:
        return f"{path}: MD5 {_md5_cache[key]}, expected {info.md5}"
    return None


# --- locating and downloading --------------------------------------------------------------


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Base directories searched, in order: ``data_dir``, ``$LEAKSIM_DATA_DIR``, user cache."""
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    if env := os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(env).expanduser())
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "leaksim")
    return list(dict.fromkeys(dirs))


def _mirrors(info: DatasetInfo, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is None and (env := os.environ.get("LEAKSIM_MIRRORS")):
        mirrors = env.split(",")
    bases = info.mirrors if mirrors is None else mirrors
    # "{name}" lets one LEAKSIM_MIRRORS value serve every dataset.
    return [b.strip().replace("{name}", info.name) for b in bases if b.strip()]


def _download(url: str, dest: Path, info: FileInfo, timeout: float) -> None:
    """Fetch ``url`` to ``dest``, or raise; ``dest`` only ever appears complete and verified."""
    # A unique temp name in the same directory + os.replace keeps concurrent clients downloading
    # into one cache safe, and never leaves a partial file under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != info.md5:
            raise DataError(f"MD5 {h.hexdigest()}, expected {info.md5}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_files(
    name: str,
    files: Iterable[str] | None = None,
    data_dir: str | Path | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Path]:
    """Verified paths of a dataset's files (keys like ``"train-labels"``; default all four).

    Uses the first searched directory that holds all of them intact; otherwise downloads the
    missing ones into the first candidate directory, trying each mirror in turn.
    """
    info = _dataset(name)
    keys = list(info.files) if files is None else list(files)
    if unknown := [k for k in keys if k not in info.files]:
        raise DataError(f"unknown {name} files {unknown}; known: {', '.join(info.files)}")

    problems: list[str] = []
    dirs = [d / name for d in candidate_dirs(data_dir)]
    for d in dirs:
        if not all((d / info.files[k].name).exists() for k in keys):
            continue
        bad = [p for k in keys if (p := _verify(d / info.files[k].name, info.files[k]))]
        if not bad:
            return {k: d / info.files[k].name for k in keys}
        problems += bad

    target = dirs[0]
    missing = [k for k in keys if _verify(target / info.files[k].name, info.files[k])]
    if download:
        urls = _mirrors(info, mirrors)
        created = [p for p in (target, *target.parents) if not p.exists()]
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problems.append(f"cannot create {target}: {e}")
            urls = []
        for k in list(missing):
            f = info.files[k]
            for base in urls:
                url = base.rstrip("/") + "/" + f.name
                log.info("downloading %s to %s", url, target)
                try:
                    _download(url, target / f.name, f, timeout)
                except (OSError, DataError, http.client.HTTPException, ValueError) as e:
                    problems.append(f"{url}: {e}")
                    continue
                missing.remove(k)
                break
        if not urls and not problems:
            problems.append("no download mirrors configured")
        if missing:  # leave no empty folders behind a failed download
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    if not missing:
        return {k: target / info.files[k].name for k in keys}

    want = "\n".join(f"  {info.files[k].name}  (MD5 {info.files[k].md5})" for k in missing)
    tried = "\n".join(f"  {p}" for p in problems) or "  (none)"
    how = "" if download else " (download=False)"
    raise DataNotFoundError(
        f"{name}: dataset files not found{how}. Put these files\n{want}\n"
        f"into the directory\n  {target}\n"
        f"(or set LEAKSIM_DATA_DIR to a directory holding {name}/<file>).\n"
        f"Searched:\n" + "\n".join(f"  {d}" for d in dirs) + f"\nProblems:\n{tried}",
        missing=[info.files[k].name for k in missing],
        target=target,
    )


def data_folder(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The folder to name in LEAKSIM_DATA_DIR for dataset ``name``'s verified files, searched
    from ``data_dir`` on (as :func:`ensure_files` searches, without downloading); None for a
    generated dataset or files not found."""
    if isinstance(_entry(name), GeneratedDataset):
        return None
    try:
        paths = ensure_files(name, None, data_dir, download=False)
    except DataNotFoundError:
        return None
    return next(iter(paths.values())).absolute().parent.parent


# --- loading -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {labels.shape} labels for {len(images)} images")
    labels = labels.astype(np.int64)
    # Shared by every caller through the cache: make in-place edits fail loudly.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_split(
    name: str,
    split: Literal["train", "test"],
    data_dir: str | Path | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    memoise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of one split, both read-only.

    Memoised per file path, as federated clients reload their data every round; the referee
    reads the training split with ``memoise=False`` so that the server process keeps no copy
    of the clients' data once it has scored. Generated sets (:class:`GeneratedDataset`) are
    generated, not read, and may have channels (N, C, H, W).
    """
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    source = _entry(name)
    if isinstance(source, GeneratedDataset):
        images, labels = source.build()
        images.flags.writeable = False
        labels.flags.writeable = False
        return images, labels
    paths = ensure_files(
        name, [f"{split}-images", f"{split}-labels"], data_dir, download, mirrors=mirrors
    )
    pair = (paths[f"{split}-images"].resolve(), paths[f"{split}-labels"].resolve())
    return _load_pair(*pair) if memoise else _load_pair.__wrapped__(*pair)


def load_labels(
    name: str, split: Literal["train", "test"], data_dir: str | Path | None = None
) -> np.ndarray:
    """The labels of one split, without reading its images (the server's shard sizes)."""
    if isinstance(_entry(name), GeneratedDataset):
        return load_split(name, split)[1]
    paths = ensure_files(name, [f"{split}-labels"], data_dir)
    return _load_labels(paths[f"{split}-labels"].resolve())


@functools.lru_cache(maxsize=8)
def _load_labels(labels_path: Path) -> np.ndarray:
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels are {labels.shape}, expected (N,)")
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) scaled to [0, 1]."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"expected uint8 images (N, H, W) or (N, C, H, W), got {images.dtype} {images.shape}"
        )
    # astype copies into a fresh writable array, so torch can share it without a warning.
    tensor = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    return tensor.unsqueeze(1) if images.ndim == 3 else tensor
