"""Weights named by URL: downloaded once into torch hub's cache, with a bounded wait, and
checked before use (docs/design.md §5d)."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from lads.errors import LadsError

TIMEOUT_S = 30.0  # the longest wait for a connection or for the next bytes of the response
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torch hub's names: ``name-<sha256 prefix>.ext``


def cache_dir() -> Path:
    """Where downloaded weights are kept: torch hub's own cache (``$TORCH_HOME/hub/checkpoints``),
    so that weights torch hub downloaded before are found."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_hash(url: str) -> str | None:
    """The SHA-256 prefix a torch-hub-style file name carries (``detr-r50-e632da11.pth``), or None."""
    match = HASH_IN_NAME.search(Path(urlparse(url).path).name)
    return match.group(1) if match else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, setting: str, timeout: float = TIMEOUT_S) -> Path:
    """The local copy of ``url``: the cached one, else downloaded (into a temporary file, checked
    for its announced size and the hash in its name, then renamed into the cache). Any failure
    is one ``LadsError`` that names ``setting`` and says how to do without the network."""
    name = Path(urlparse(url).path).name
    if not name:
        raise LadsError(f"{setting}={url}: the URL names no file")
    path, prefix = cache_dir() / name, expected_hash(url)
    if path.exists():
        if prefix is None or sha256(path).startswith(prefix):
            return path
        path.unlink()  # a corrupt copy, say from an older tool: download again
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        size = os.path.getsize(tmp)
        if announced is not None and size != int(announced):
            raise LadsError(f"{setting}={url}: the download stopped at {size} of {announced} bytes; run again")
        if prefix is not None and not sha256(Path(tmp)).startswith(prefix):
            raise LadsError(f"{setting}={url}: the downloaded file's SHA-256 does not start with {prefix}, "
                            "as its name says it should")
        os.replace(tmp, path)
        return path
    except LadsError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError,
            ValueError) as e:
        reason = (f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError)
                  else getattr(e, "reason", None) or repr(e))
        raise LadsError(f"{setting}={url}: cannot download it ({reason}); give a local copy's path instead "
                        f"({setting}=/path/to/{name}), or put the file in {path.parent}") from None
    except OSError as e:
        raise LadsError(f"{setting}={url}: cannot write the download to {path.parent} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
