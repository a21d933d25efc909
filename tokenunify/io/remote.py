"""Fetching remote files (http(s)://, hf://, s3://, gs://) and unpacking .gz files into a
local cache.

Files land in ``$TOKENUNIFY_CACHE`` (default ``~/.cache/tokenunify``) under a name derived from
the URL, written to a temporary name and renamed when complete, so an interrupted fetch never
leaves a truncated file that looks whole. (hf:// files fetched through huggingface_hub, when it
is installed, stay in huggingface_hub's own cache instead.)

- A source's ``sha256`` is checked before a fetched file enters the cache: a mismatch is an
  error naming the URL and both digests, and nothing is cached.
- A URL with one integer range ``{first..last}`` (``.../iso.{2600..2849}.png``) is a stack of
  slices: each is fetched, in order, into one cache folder read as a slice folder; its
  ``sha256`` is that of all slices' bytes concatenated in order (``cat iso.*.png | sha256sum``).
- ``TOKENUNIFY_MIRROR`` lists local copies of remote folders, ``URL_PREFIX=DIR`` separated by
  ``;``: a URL under a prefix is read from the folder instead of the network (and still checked
  against its ``sha256``). The tests use it to read the public example data from a local copy.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlparse

import requests
from tqdm.auto import tqdm

from tokenunify.io import objectstore

log = logging.getLogger(__name__)

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


def cache_dir() -> Path:
    """The cache folder (created on demand)."""
    root = Path(os.environ.get("TOKENUNIFY_CACHE", Path.home() / ".cache" / "tokenunify"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cache_name(key: str, suffix: str) -> Path:
    h = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / f"{h}{suffix}"


def _suffix_of(name: str) -> str:
    """'.h5.gz' for 'a/b.h5.gz', '.tif' for 'x.tif'."""
    parts = Path(urlparse(name).path).name.split(".")
    return "." + ".".join(parts[-2:]) if len(parts) > 2 and parts[-1] == "gz" else (
        "." + parts[-1] if len(parts) > 1 else "")


def parse_hf(url: str) -> tuple[str, str, str, str]:
    """Split ``hf://datasets/ORG/REPO[@REV]/PATH`` into (repo_type, repo_id, revision, path).

    ``hf://ORG/REPO/PATH`` (no type) means a model repo, as in huggingface_hub's filesystem.
    """
    rest = url[len("hf://"):]
    parts = rest.split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "models", "spaces"):
        repo_type = parts.pop(0)[:-1]
    if len(parts) < 3:
        raise ValueError(f"hf:// URL needs ORG/REPO/PATH: {url}")
    org, repo, path = parts[0], parts[1], "/".join(parts[2:])
    revision = "main"
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return repo_type, f"{org}/{repo}", revision, path


def hf_resolve_url(url: str) -> str:
    """The plain-HTTP download URL of an hf:// file (honours ``HF_ENDPOINT``)."""
    repo_type, repo_id, revision, path = parse_hf(url)
    endpoint = os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")
    prefix = {"dataset": "datasets/", "space": "spaces/", "model": ""}[repo_type]
    return f"{endpoint}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


RANGE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_range(url: str) -> list[str] | None:
    """The URLs of a slice stack ``...{first..last}...`` in order (zero padding kept when
    ``first`` has it); None when ``url`` has no range."""
    m = RANGE_RE.search(url)
    if m is None:
        return None
    a, b = m.group(1), m.group(2)
    if int(b) < int(a) or RANGE_RE.search(url, m.end()):
        raise ValueError(f"{url}: give one range {{first..last}} with first <= last")
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    return [url[:m.start()] + str(i).zfill(width) + url[m.end():]
            for i in range(int(a), int(b) + 1)]


def mirrored(url: str) -> Path | None:
    """The local copy of ``url`` under a ``TOKENUNIFY_MIRROR`` prefix, or None."""
    for entry in filter(None, os.environ.get("TOKENUNIFY_MIRROR", "").split(";")):
        prefix, sep, folder = entry.partition("=")
        if not sep:
            raise ValueError(f"TOKENUNIFY_MIRROR entry {entry!r} is not URL_PREFIX=DIR")
        if url.startswith(prefix.rstrip("/") + "/"):
            return Path(folder) / url[len(prefix.rstrip("/")) + 1:]
    return None


def is_mirrored(url: str) -> bool:
    """Whether ``url`` (or the first slice of a stack) has a local ``TOKENUNIFY_MIRROR`` copy."""
    first = (expand_range(url) or [url])[0]
    local = mirrored(first)
    return local is not None and local.is_file()


def sha256_of(paths: list[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _check(paths: list[Path], sha256: str | None, url: str) -> None:
    if sha256 is None:
        return
    got = sha256_of(paths)
    if got != sha256.lower():
        raise OSError(f"{url}: SHA-256 {got} does not match the source's sha256 {sha256}; "
                      "the file changed upstream or the download is damaged (nothing was cached)")


@contextmanager
def _staged(dest: Path, sha256: str | None, url: str):
    """A temporary file beside ``dest`` to write; on success it is checked against ``sha256``
    and renamed to ``dest``, on any error removed (nothing half-written enters the cache)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        _check([Path(tmp)], sha256, url)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_path(url: str) -> Path | None:
    """Where a remote file (or slice stack, or object-store zarr) would be cached, if it
    already is; else None."""
    if expand_range(url) is not None:
        p = _cache_name(url, ".slices")
        return p if p.is_dir() else None
    if objectstore.is_object_url(url) and url.rstrip("/").endswith(".zarr"):
        p = _cache_name(url.rstrip("/"), ".zarr")
        return p if p.is_dir() else None
    p = _cache_name(url, _suffix_of(url))
    return p if p.is_file() else None


def fetch_stack(url: str, sha256: str | None = None, progress: bool | None = None,
                timeout: float = 60.0) -> Path:
    """Fetch the slice stack ``url`` (with ``{first..last}``) into one cache folder, once; the
    files are numbered in order (``00000.png``, ...) so the folder reads as the stack."""
    dest = _cache_name(url, ".slices")
    if dest.is_dir():
        return dest
    urls = expand_range(url)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name, suffix=".part"))
    try:
        names = []
        for i, u in enumerate(tqdm(urls, desc=Path(url).name, unit="file",
                                   disable=None if progress is None else not progress)):
            names.append(fetch(u, progress=False, timeout=timeout,
                               into=tmp / f"{i:05d}{_suffix_of(u)}"))
        _check(names, sha256, url)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch(url: str, progress: bool | None = None, timeout: float = 60.0,
          sha256: str | None = None, into: Path | None = None) -> Path:
    """Download ``url`` (http, https, hf://, s3:// or gs://) into the cache, once; return the
    local path. An s3:// or gs:// ``.zarr`` store is fetched as a folder
    (:mod:`tokenunify.io.objectstore`; credentials from the standard environment).

    hf:// files go through ``huggingface_hub.hf_hub_download`` when that package is installed,
    and through the plain ``/resolve/`` HTTP endpoint otherwise (token from ``HF_TOKEN``).

    A URL under a ``TOKENUNIFY_MIRROR`` prefix is read from its local copy (checked against
    ``sha256``, not copied). ``into``: write the file there instead of the cache (the slices of
    a stack, into the stack's folder being built).

    Raises:
        OSError: the server answered with an error, the body was shorter than announced, or the
            file's SHA-256 is not ``sha256``.
    """
    local = mirrored(url)
    if local is not None:
        if not local.is_file():
            raise OSError(f"{url}: its TOKENUNIFY_MIRROR copy {local} does not exist")
        _check([local], sha256, url)
        if into is not None:
            shutil.copyfile(local, into)
            return into
        return local
    if objectstore.is_object_url(url) and url.rstrip("/").endswith(".zarr"):
        dest = _cache_name(url.rstrip("/"), ".zarr")
        return dest if dest.is_dir() else objectstore.download_folder(url, dest)
    dest = into if into is not None else _cache_name(url, _suffix_of(url))
    if dest.is_file() and into is None:
        return dest
    if objectstore.is_object_url(url):
        with _staged(dest, sha256, url) as tmp:
            objectstore.download(url, tmp)
        return dest
    if url.startswith("hf://"):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            http_url = hf_resolve_url(url)
        else:
            repo_type, repo_id, revision, path = parse_hf(url)
            local = Path(hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision))
            _check([local], sha256, url)
            return local
    else:
        http_url = url
    headers = {}
    if url.startswith("hf://") and os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    log.info("fetching %s", http_url)
    with requests.get(http_url, stream=True, timeout=timeout, headers=headers) as r:
        if r.status_code != 200:
            raise OSError(f"GET {http_url} answered HTTP {r.status_code}")
        total = int(r.headers.get("Content-Length", 0)) or None
        got = 0
        with _staged(dest, sha256, url) as tmp:
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                            desc=Path(http_url).name,
                                            disable=None if progress is None else not progress,
                                            ) as bar:
                for block in r.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            if total is not None and got != total and "Content-Encoding" not in r.headers:
                raise OSError(f"GET {http_url}: got {got} bytes of {total}")
    return dest


def gunzip_cached(path: Path) -> Path:
    """Decompress ``path`` (a .gz file) into the cache once, streaming; return the result.

    The cache name depends on the absolute path, size and mtime, so a changed file is unpacked
    again.
    """
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    dest = _cache_name(key, _suffix_of(path.name)[: -len(".gz")] or ".bin")
    if dest.is_file():
        return dest
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(tmp, dest)
    except (OSError, EOFError) as exc:
        raise OSError(f"{path}: cannot gunzip: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
