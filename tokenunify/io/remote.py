"""Fetching remote files (http(s)://, hf://) and unpacking .gz files into a local cache.

Files land in ``$TOKENUNIFY_CACHE`` (default ``~/.cache/tokenunify``) under a name derived from
the URL, written to a temporary name and renamed when complete, so an interrupted fetch never
leaves a truncated file that looks whole. (hf:// files fetched through huggingface_hub, when it
is installed, stay in huggingface_hub's own cache instead.)
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote, urlparse

import requests
from tqdm.auto import tqdm

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


def cached_path(url: str) -> Path | None:
    """Where a remote file would be cached, if it already is; else None."""
    p = _cache_name(url, _suffix_of(url))
    return p if p.is_file() else None


def fetch(url: str, progress: bool | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` (http, https or hf://) into the cache, once; return the local path.

    hf:// files go through ``huggingface_hub.hf_hub_download`` when that package is installed,
    and through the plain ``/resolve/`` HTTP endpoint otherwise (token from ``HF_TOKEN``).

    Raises:
        OSError: the server answered with an error, or the body was shorter than announced.
    """
    dest = _cache_name(url, _suffix_of(url))
    if dest.is_file():
        return dest
    if url.startswith("hf://"):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            http_url = hf_resolve_url(url)
        else:
            repo_type, repo_id, revision, path = parse_hf(url)
            local = hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision)
            return Path(local)
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
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
        got = 0
        try:
            with os.fdopen(fd, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                                desc=Path(http_url).name,
                                                disable=None if progress is None else not progress,
                                                ) as bar:
                for block in r.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            if total is not None and got != total and "Content-Encoding" not in r.headers:
                raise OSError(f"GET {http_url}: got {got} bytes of {total}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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
