"""simulator.data: IDX parsing, MD5-checked lookup, and downloads from a real local HTTP mirror."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator.data import datasets as data
from simulator.data.datasets import (
    IDX_DATASETS,
    DataError,
    DataNotFoundError,
    ensure_files,
    load_split,
    md5sum,
    read_idx,
    to_tensor,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No LEAKSIM_* variables and an empty per-test user cache; returns the cache's leaksim dir."""
    monkeypatch.delenv("LEAKSIM_DATA_DIR", raising=False)
    monkeypatch.delenv("LEAKSIM_MIRRORS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "leaksim"


class Mirror:
    """A real HTTP server on 127.0.0.1 serving ``root``; ``url(sub)`` is a mirror base URL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                mirror.requests.append(self.path)

        handler = functools.partial(Handler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        serve = functools.partial(self.server.serve_forever, poll_interval=0.02)  # fast shutdown
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def url(self, sub: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{sub}/"

    def publish(self, sub: str, source: Path, names: list[str]) -> Path:
        """Expose ``source/<name>`` files under ``/<sub>/`` (as symlinks)."""
        d = self.root / sub
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            (d / name).symlink_to(source / name)
        return d

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "served")
    m.root.mkdir()
    yield m
    m.close()


def _names(name: str, keys: list[str]) -> list[str]:
    return [IDX_DATASETS[name].files[k].name for k in keys]


def _no_temp_files(*dirs: Path) -> None:
    for d in dirs:
        if d.exists():
            leftovers = [p.name for p in d.rglob("*") if p.name.startswith(".")]
            assert not leftovers, f"temporary files left in {d}: {leftovers}"


# --- the real files --------------------------------------------------------------------------


def test_registry_matches_the_shared_files(shared_data_dir: Path) -> None:
    for name, info in IDX_DATASETS.items():
        assert info.name == name and info.description and info.mirrors
        assert set(info.files) == {"train-images", "train-labels", "test-images", "test-labels"}
        for f in info.files.values():
            path = shared_data_dir / name / f.name
            assert path.stat().st_size == f.size, path
            assert md5sum(path) == f.md5, path
    assert IDX_DATASETS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


@pytest.mark.parametrize(
    ("split", "n", "counts"),
    [("train", 60000, MNIST_TRAIN_COUNTS), ("test", 10000, MNIST_TEST_COUNTS)],
)
def test_mnist_split_loads(
    env: Path, shared_data_dir: Path, split: str, n: int, counts: list[int]
) -> None:
    images, labels = load_split("mnist", split, shared_data_dir)  # type: ignore[arg-type]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == counts and sum(counts) == n
    assert images.max() == 255 and images.min() == 0
    again = load_split("mnist", split, shared_data_dir)  # type: ignore[arg-type]
    assert again[0] is images and again[1] is labels  # memoised
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1  # the memoised arrays are shared: edits must fail, not leak


def test_fashion_mnist_labels_are_balanced(shared_data_dir: Path) -> None:
    d = shared_data_dir / "fashion-mnist"
    train = read_idx(d / "train-labels-idx1-ubyte.gz")
    test = read_idx(d / "t10k-labels-idx1-ubyte.gz")
    assert train.dtype == np.uint8 and train.shape == (60000,)
    assert np.bincount(train).tolist() == [6000] * 10
    assert np.bincount(test).tolist() == [1000] * 10


def test_to_tensor(env: Path, shared_data_dir: Path) -> None:
    images, _ = load_split("mnist", "test", shared_data_dir)
    x = to_tensor(images[:64])
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x[3, 0] * 255, torch.from_numpy(images[3].astype(np.float32)))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(images.astype(np.float32))


def test_unknown_dataset_and_split(env: Path, shared_data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"'cifar10'.*fashion-mnist, mnist"):
        load_split("cifar10", "train", shared_data_dir)
    with pytest.raises(DataError, match="'val'"):
        load_split("mnist", "val", shared_data_dir)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="'valid-labels'"):
        ensure_files("mnist", ["valid-labels"], shared_data_dir)


# --- malformed IDX files -------------------------------------------------------------------


def _idx(magic: int, dims: list[int], payload: bytes) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return gzip.compress(head + payload, mtime=0)


def test_read_idx_small_valid_files(tmp_path: Path) -> None:
    (tmp_path / "l.gz").write_bytes(_idx(2049, [3], bytes([7, 0, 9])))
    assert read_idx(tmp_path / "l.gz").tolist() == [7, 0, 9]
    pixels = bytes(range(2 * 3 * 4))
    (tmp_path / "i.gz").write_bytes(_idx(2051, [2, 3, 4], pixels))
    img = read_idx(tmp_path / "i.gz")
    assert img.shape == (2, 3, 4) and img.dtype == np.uint8 and img[1, 2, 3] == 23


BAD_FILES = [
    (_idx(2050, [3], b"abc"), "magic number 2050"),
    (_idx(2049, [5], b"abc"), "header declares 5 = 5 data bytes but the file holds 3"),
    (_idx(2049, [2], b"abc"), "holds more than 2"),
    (_idx(2051, [2, 28, 28], bytes(784)), "2x28x28 = 1568 data bytes but the file holds 784"),
    (_idx(2051, [2], b""), "IDX header truncated"),
    (gzip.compress(b"\x00\x00", mtime=0), "magic number"),
    (b"plain text, not gzip", "cannot read as a gzipped IDX file"),
]


# Named by the message: test processes collecting at different seconds (pytest -n) must agree
# on every test's name, which gzip's time stamp in the bytes would otherwise be part of.
@pytest.mark.parametrize(("content", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_read_idx_rejects_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_and_corrupted_gzip(tmp_path: Path, shared_data_dir: Path) -> None:
    good = (shared_data_dir / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()
    truncated = tmp_path / "truncated-idx1-ubyte.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cannot read") as info:
        read_idx(truncated)
    assert str(truncated) in str(info.value)

    flipped = bytearray(good)
    for i in range(len(good) // 3, len(good) // 3 + 64):
        flipped[i] ^= 0xFF
    corrupted = tmp_path / "corrupted-idx1-ubyte.gz"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(DataError) as info:
        read_idx(corrupted)
    assert str(corrupted) in str(info.value)


# --- where files are looked for ------------------------------------------------------------


def _copy(src: Path, dst: Path, name: str, names: list[str]) -> Path:
    d = dst / name
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(src / name / n, d / n)
    return d


def test_search_order_and_completeness(
    env: Path, tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ["train-labels", "test-labels"]
    names = _names("fashion-mnist", keys)
    explicit, from_env = tmp_path / "explicit", tmp_path / "from-env"
    _copy(shared_data_dir, from_env, "fashion-mnist", names)
    _copy(shared_data_dir, env, "fashion-mnist", names)
    monkeypatch.setenv("LEAKSIM_DATA_DIR", str(from_env))

    found = ensure_files("fashion-mnist", keys, download=False)
    assert found["test-labels"] == from_env / "fashion-mnist" / names[1]

    # A location with only some of the needed files does not count.
    _copy(shared_data_dir, explicit, "fashion-mnist", names[:1])
    found = ensure_files("fashion-mnist", keys, explicit, download=False)
    assert found["train-labels"].parent == from_env / "fashion-mnist"

    _copy(shared_data_dir, explicit, "fashion-mnist", names[1:])
    found = ensure_files("fashion-mnist", keys, explicit, download=False)
    assert found["train-labels"].parent == explicit / "fashion-mnist"

    monkeypatch.delenv("LEAKSIM_DATA_DIR")
    found = ensure_files("fashion-mnist", keys, download=False)
    assert found["train-labels"].parent == env / "fashion-mnist"


def test_corrupted_local_file_is_skipped(env: Path, tmp_path: Path, shared_data_dir: Path) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    bad = _copy(shared_data_dir, tmp_path / "bad", "mnist", [name])
    raw = bytearray((bad / name).read_bytes())
    raw[100] ^= 1  # same size, different MD5
    (bad / name).write_bytes(bytes(raw))
    _copy(shared_data_dir, env, "mnist", [name])

    found = ensure_files("mnist", ["test-labels"], tmp_path / "bad", download=False)
    assert found["test-labels"] == env / "mnist" / name

    shutil.rmtree(env)
    with pytest.raises(DataNotFoundError) as info:
        ensure_files("mnist", ["test-labels"], tmp_path / "bad", download=False)
    msg = str(info.value)
    assert f"{bad / name}: MD5 " in msg and "expected ec29112dd5afa0611ce80d1b7f02629c" in msg


def test_md5_is_cached_per_path_mtime_and_size(
    env: Path, tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    d = _copy(shared_data_dir, tmp_path, "mnist", [name])
    calls: list[Path] = []
    real = data.md5sum

    def counting(path: str | Path, chunk_size: int = 1 << 20) -> str:
        calls.append(Path(path))
        return real(path, chunk_size)

    monkeypatch.setattr(data, "md5sum", counting)
    for _ in range(3):
        ensure_files("mnist", ["test-labels"], tmp_path, download=False)
    assert len(calls) == 1
    st = (d / name).stat()
    os.utime(d / name, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ensure_files("mnist", ["test-labels"], tmp_path, download=False)
    assert len(calls) == 2


# --- downloads from a real HTTP server -----------------------------------------------------


def test_download_into_empty_cache_then_load(
    env: Path, mirror: Mirror, shared_data_dir: Path
) -> None:
    names = _names("mnist", ["test-images", "test-labels"])
    mirror.publish("good", shared_data_dir / "mnist", names)

    images, labels = load_split("mnist", "test", mirrors=[mirror.url("good")])

    assert sorted(p.name for p in (env / "mnist").iterdir()) == sorted(names)
    for key, f in IDX_DATASETS["mnist"].files.items():
        if key.startswith("test-"):
            assert md5sum(env / "mnist" / f.name) == f.md5
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == MNIST_TEST_COUNTS
    assert sorted(mirror.requests) == sorted(f"/good/{n}" for n in names)


@pytest.mark.parametrize("where", ["data_dir", "LEAKSIM_DATA_DIR"])
def test_download_goes_to_first_candidate(
    env: Path,
    tmp_path: Path,
    mirror: Mirror,
    shared_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    names = _names("fashion-mnist", ["test-labels"])
    mirror.publish("fashion-mnist", shared_data_dir / "fashion-mnist", names)
    # LEAKSIM_MIRRORS, with {name} standing for the dataset.
    monkeypatch.setenv("LEAKSIM_MIRRORS", f" {mirror.url('nowhere')} ,{mirror.url('{name}')}")
    target = tmp_path / "target"
    if where == "LEAKSIM_DATA_DIR":
        monkeypatch.setenv("LEAKSIM_DATA_DIR", str(target))
        found = ensure_files("fashion-mnist", ["test-labels"])
    else:
        found = ensure_files("fashion-mnist", ["test-labels"], target)
    assert found["test-labels"] == target / "fashion-mnist" / names[0]
    assert md5sum(found["test-labels"]) == IDX_DATASETS["fashion-mnist"].files["test-labels"].md5
    assert not env.exists()


def test_corrupted_mirror_falls_back_to_the_next(
    env: Path, mirror: Mirror, shared_data_dir: Path
) -> None:
    keys = ["train-labels", "test-labels"]
    names = _names("fashion-mnist", keys)
    src = shared_data_dir / "fashion-mnist"
    mirror.publish("good", src, names)
    bad = mirror.root / "bad"
    bad.mkdir()
    raw = bytearray((src / names[1]).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / names[1]).write_bytes(bytes(raw))  # test labels corrupted, train labels absent
    # A stale corrupted copy in the cache is replaced, never trusted.
    (env / "fashion-mnist").mkdir(parents=True)
    (env / "fashion-mnist" / names[1]).write_bytes(bytes(raw))

    found = ensure_files("fashion-mnist", keys, mirrors=[mirror.url("bad"), mirror.url("good")])

    for key, name in zip(keys, names, strict=True):
        assert found[key] == env / "fashion-mnist" / name
        assert md5sum(found[key]) == IDX_DATASETS["fashion-mnist"].files[key].md5
    assert sorted(p.name for p in (env / "fashion-mnist").iterdir()) == sorted(names)
    assert f"/bad/{names[1]}" in mirror.requests and f"/good/{names[1]}" in mirror.requests
    _no_temp_files(env)


def test_unresponsive_and_refusing_mirrors_fall_back(
    env: Path, mirror: Mirror, shared_data_dir: Path
) -> None:
    names = _names("mnist", ["test-labels"])
    mirror.publish("good", shared_data_dir / "mnist", names)
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections, never answers: the timeout must fire
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        urls = [
            f"http://127.0.0.1:{silent.getsockname()[1]}/",
            f"http://127.0.0.1:{closed.getsockname()[1]}/",
            mirror.url("good"),
        ]
        found = ensure_files("mnist", ["test-labels"], mirrors=urls, timeout=0.5)
    assert md5sum(found["test-labels"]) == IDX_DATASETS["mnist"].files["test-labels"].md5
    _no_temp_files(env)


def test_missing_everywhere_says_what_to_put_where(
    env: Path, tmp_path: Path, mirror: Mirror, shared_data_dir: Path
) -> None:
    have = _names("mnist", ["train-labels"])
    mirror.publish("m1", shared_data_dir / "mnist", have)
    (mirror.root / "m2").mkdir()
    urls = [mirror.url("m1"), mirror.url("m2")]

    with pytest.raises(DataNotFoundError) as info:
        ensure_files("mnist", ["train-labels", "test-labels"], tmp_path / "explicit", mirrors=urls)

    msg = str(info.value)
    target = tmp_path / "explicit" / "mnist"
    assert "t10k-labels-idx1-ubyte.gz  (MD5 ec29112dd5afa0611ce80d1b7f02629c)" in msg
    assert f"into the directory\n  {target}\n" in msg
    assert "train-labels" not in msg.split("Searched:")[0]  # downloaded, so not asked for
    for searched in (target, env / "mnist"):
        assert f"\n  {searched}\n" in msg
    for url in urls:
        assert f"  {url}t10k-labels-idx1-ubyte.gz: HTTP Error 404" in msg
    # The file that could be fetched is in place; nothing half-written anywhere.
    assert sorted(p.name for p in target.iterdir()) == have
    _no_temp_files(target, env)
    assert isinstance(info.value, DataError) and isinstance(info.value, RuntimeError)


def test_no_download_when_disabled(env: Path, mirror: Mirror, shared_data_dir: Path) -> None:
    mirror.publish("good", shared_data_dir / "mnist", _names("mnist", ["test-labels"]))
    with pytest.raises(DataNotFoundError, match=r"download=False"):
        ensure_files("mnist", ["test-labels"], download=False, mirrors=[mirror.url("good")])
    assert mirror.requests == [] and not env.exists()


def test_corrupted_download_never_lands_under_the_final_name(
    env: Path, mirror: Mirror, shared_data_dir: Path
) -> None:
    name = _names("mnist", ["test-labels"])[0]
    (mirror.root / "only").mkdir()
    (mirror.root / "only" / name).write_bytes(
        (shared_data_dir / "mnist" / name).read_bytes()[:-10]  # truncated in transit
    )
    with pytest.raises(DataNotFoundError) as info:
        ensure_files("mnist", ["test-labels"], mirrors=[mirror.url("only")])
    assert f"{mirror.url('only')}{name}: MD5 " in str(info.value)
    assert not (env / "mnist").exists()  # no partial file, no empty folder


def test_a_failed_download_leaves_no_empty_folders(tmp_path: Path, monkeypatch) -> None:
    from simulator.data.datasets import DataNotFoundError, load_split

    cache = tmp_path / "cache"
    monkeypatch.delenv("LEAKSIM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    with pytest.raises(DataNotFoundError):
        load_split("mnist", "test", mirrors=["http://127.0.0.1:9/"])
    assert not cache.exists()


def test_red_blue_is_generated_with_its_own_shape() -> None:
    from simulator.core.registry import DATASETS

    images, labels = load_split("red-blue", "train")
    assert DATASETS.entry("red-blue").value.shape == (3, 16, 16) and images.shape == (20, 3, 16, 16)
    tensor = to_tensor(images)
    assert torch.equal(tensor[:10, 0], torch.ones(10, 16, 16)) and tensor[:10, 1:].sum() == 0
    assert labels.tolist() == [1] * 10 + [0] * 10


def test_files_verified_by_the_driver_are_not_hashed_again_by_clients(
    shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.VERIFIED_ENV, "[]")  # restored to unset afterwards
    ensure_files("mnist", ["test-labels"], shared_data_dir)
    data.share_verified()
    monkeypatch.setattr(data, "_md5_cache", {})  # a fresh client process

    def no_hashing(_path: object, chunk_size: int = 0) -> str:
        raise AssertionError("a verified file was hashed again")

    monkeypatch.setattr(data, "md5sum", no_hashing)
    assert ensure_files("mnist", ["test-labels"], shared_data_dir)["test-labels"].is_file()
    monkeypatch.setenv(data.VERIFIED_ENV, "[]")  # nothing shared: the client must hash
    monkeypatch.setattr(data, "_md5_cache", {})
    with pytest.raises(AssertionError, match="hashed again"):
        ensure_files("mnist", ["test-labels"], shared_data_dir)
