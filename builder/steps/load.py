"""The `resolve` step: the source files on local disk at the pinned revision, and the model class for the task.

A local folder is used in place. A Hub repo is downloaded with huggingface_hub's `snapshot_download` at the commit
`builder.source` resolved (so HF_ENDPOINT, HF_TOKEN and the Hub cache apply): safetensors, JSON configs and
tokenizer files only, plus pickle weights with `source.allow_pickle` and Python files with `trust_remote_code`.
"""

from __future__ import annotations

from pathlib import Path

from builder.context import BuildContext
from builder.errors import SourceError

# What a transformers model folder needs besides its weights.
_HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


def resolve(ctx: BuildContext) -> None:
    """Make `ctx.source_dir` a local folder holding the source at `ctx.plan.source.revision`."""
    source = ctx.loaded.recipe.source
    if ctx.plan.source.path is not None:
        ctx.source_dir = ctx.plan.source.path
    else:
        ctx.source_dir = download(
            source.model,
            ctx.plan.source.revision,
            allow_pickle=source.allow_pickle,
            remote_code=source.trust_remote_code,
        )


def download(repo_id: str, commit: str, *, allow_pickle: bool, remote_code: bool) -> Path:
    """The Hub snapshot of `repo_id` at `commit` (from the Hub cache when it is there). Raises `SourceError`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = (
        list(_HUB_PATTERNS) + (list(_PICKLE_PATTERNS) if allow_pickle else []) + (["*.py"] if remote_code else [])
    )
    try:
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise SourceError(
            f"cannot download {repo_id}@{commit[:12]} from the Hub: {error}; check the network, "
            "HF_ENDPOINT and HF_TOKEN, or pre-fill the Hub cache (HF_HUB_CACHE)"
        ) from None
