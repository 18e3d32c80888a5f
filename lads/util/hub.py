"""Checkpoints on the Hugging Face Hub (docs/design.md §3b): a model id (``org/name``, with a
revision) resolves to a folder in the local Hub cache through ``huggingface_hub``, which honours
``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``; ``upload_folder`` uploads what ``save_pretrained`` writes."""

from __future__ import annotations

import re
from pathlib import Path

from lads.errors import LadsError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHARED_FILES = ["*.safetensors", "*.json", "README.md", "text/*"]  # not the optimizer state


def resolve_pretrained(name_or_path, revision: str | None = None, cache_dir=None) -> Path:
    """A local checkpoint or run folder as it is; else a Hub id, downloaded into (or, offline,
    found in) the Hub cache."""
    path = Path(name_or_path)
    if path.exists() or not HUB_ID.match(str(name_or_path)):
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                      allow_patterns=SHARED_FILES))
    except Exception as e:  # not found, offline without a cached copy, no network, gated …
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if constants.HF_HUB_OFFLINE else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadsError(f"{name_or_path}: no such local folder, and no such model on the Hugging Face Hub"
                        f"{' at revision ' + revision if revision else ''}{offline}: {reason}") from None


def upload_folder(folder, repo_id: str, private: bool = False, token: str | None = None,
                  message: str = "Upload a LADS checkpoint") -> str:
    """Upload a checkpoint folder to ``repo_id`` (created if needed); returns the URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message))
    except Exception as e:
        raise LadsError(f"push_to_hub {repo_id}: {str(e).strip().splitlines()[0]}") from None
