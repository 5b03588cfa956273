"""Resolve a SRC argument to a local folder: an existing path, or a hub repo id through huggingface_hub.

Contract: a path that exists is used as is. Otherwise a string shaped like a repo id (`owner/name` or `name`) is
fetched with `snapshot_download` (only safetensors, JSON and tokenizer files; `revision`; honours `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE`, so an offline machine resolves from its local cache). Failures raise
`ConvertError` with the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConvertError

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "tokenizer*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_source(src: str, revision: str | None = None) -> Path:
    p = Path(src).expanduser()
    if p.exists():
        if revision:
            raise ConvertError(f"--revision applies to hub repos, but {src!r} is a local folder; drop --revision")
        return p
    if src.startswith((".", "/", "~")) or src.count("/") > 1 or not _REPO_ID.match(src):
        raise ConvertError(f"source {src!r} does not exist; give a checkpoint folder or a hub repo id like Qwen/Qwen3-30B-A3B")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ConvertError("huggingface_hub is not installed; pip install huggingface-hub") from e
    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except RevisionNotFoundError as e:
        raise ConvertError(f"hub repo {src!r} has no revision {revision!r}; check --revision") from e
    except GatedRepoError as e:
        raise ConvertError(f"hub repo {src!r} is gated; accept its terms on the hub and log in with `hf auth login`") from e
    except RepositoryNotFoundError as e:
        raise ConvertError(f"source {src!r} is neither a local folder nor a hub repo you can access; check the name or log in") from e
    except LocalEntryNotFoundError as e:
        raise ConvertError(
            f"{src!r} is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE or no network); download it first or unset HF_HUB_OFFLINE"
        ) from e
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot fetch {src!r} from the hub: {e}") from e
