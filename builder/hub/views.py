"""The registry's JSON documents in the Hub's shapes (what huggingface_hub's ModelInfo, RepoFile, RepoFolder,
GitRefs and GitCommitInfo parse), computed from the store's plain data."""

from __future__ import annotations

import hashlib

from builder.card import front_matter
from builder.hub.store import Entry, lfs_pointer

MAX_CARD_VALUES = 10_000  # a card's metadata is tags and a few fields; aliases could expand 300 bytes to gigabytes


def repo_info(
    repo: str, oid: str, meta: dict, commit: dict, files: dict[str, Entry], *, blobs: bool, readme: str | None
) -> dict:
    """GET /api/{type}s/{id}[/revision/{rev}]: `siblings` (with sizes and LFS info when `blobs`), and the card's
    tags, pipeline_tag, library_name and cardData when there is a README.md."""
    info = {
        "_id": repo,
        "id": repo,
        "modelId": repo,
        "author": repo.split("/")[0],
        "sha": oid,
        "private": bool(meta.get("private")),
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "lastModified": commit["date"],
        "createdAt": meta["created_at"],
        "tags": [],
        "siblings": [_sibling(path, entry, blobs) for path, entry in files.items()],
        "usedStorage": sum(entry.size for entry in files.values()),
    }
    info.update(card_metadata(readme))
    return info


def _sibling(path: str, entry: Entry, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": path}
    sibling = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
    if entry.lfs:
        sibling["lfs"] = {
            "sha256": entry.sha256,
            "size": entry.size,
            "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
        }
    return sibling


def card_yaml(text: str) -> object:
    """A card's YAML metadata as plain data. Raises ValueError for YAML that does not parse, or that (counting
    every value an alias repeats) holds more than `MAX_CARD_VALUES` values, or nests too deeply."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise ValueError(" ".join(str(error).split())) from None
    except RecursionError:
        raise ValueError("the metadata is nested too deeply") from None
    seen, pending = 0, [(node, 0)] if node is not None else []
    while pending:  # the size after alias expansion, without expanding anything
        current, depth = pending.pop()
        seen += 1
        if seen > MAX_CARD_VALUES or depth > 100:
            raise ValueError(
                f"the metadata expands to more than {MAX_CARD_VALUES:,} values or 100 levels (YAML "
                "aliases repeat what they name); a card's metadata is far smaller"
            )
        if isinstance(current, yaml.SequenceNode):
            pending += [(child, depth + 1) for child in current.value]
        elif isinstance(current, yaml.MappingNode):
            pending += [(child, depth + 1) for pair in current.value for child in pair]
    try:
        return yaml.SafeLoader("").construct_document(node) if node is not None else None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as error:
        raise ValueError(" ".join(str(error).split())) from None


def card_metadata(readme: str | None) -> dict:
    """tags, pipeline_tag, library_name and cardData from a README's YAML block, as the Hub reports them; nothing
    when the block does not parse or is too large (see `card_yaml`)."""
    if not readme or (block := front_matter(readme)) is None:
        return {}
    try:
        front = card_yaml(block)
    except ValueError:
        return {}
    if not isinstance(front, dict):
        return {}
    return {
        "cardData": front,
        "tags": list(front.get("tags") or []),
        "pipeline_tag": front.get("pipeline_tag"),
        "library_name": front.get("library_name"),
    }


def tree(files: dict[str, Entry], folder: str, *, recursive: bool) -> list[dict]:
    """GET /api/{type}s/{id}/tree/{rev}/{folder}: the folder's files and sub-folders (all depths when
    `recursive`), sorted by path. Empty when `folder` holds nothing."""
    prefix = folder.rstrip("/") + "/" if folder else ""
    entries: dict[str, dict] = {}
    for path, entry in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            directory = prefix + "/".join(parts[:depth])
            entries.setdefault(
                directory, {"type": "directory", "path": directory, "oid": hashlib.sha1(directory.encode()).hexdigest()}
            )
        if len(parts) == 1 or recursive:
            entries[path] = _tree_file(path, entry)
    return [entries[path] for path in sorted(entries)]


def _tree_file(path: str, entry: Entry) -> dict:
    item = {"type": "file", "path": path, "size": entry.size, "oid": entry.git_oid}
    if entry.lfs:
        item["lfs"] = {
            "oid": entry.sha256,
            "size": entry.size,
            "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
        }
    return item


def refs(refs: dict) -> dict:
    """GET /api/{type}s/{id}/refs (pull requests included; the client drops them unless asked)."""
    return {
        "branches": [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(refs["heads"].items())
        ],
        "tags": [],
        "converts": [],
        "pullRequests": [
            {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": oid}
            for n, oid in sorted(refs["pulls"].items(), key=lambda item: int(item[0]))
        ],
    }


def commits(history: list[dict]) -> list[dict]:
    """GET /api/{type}s/{id}/commits/{rev}: newest first."""
    return [
        {
            "id": c["oid"],
            "title": c["title"],
            "message": c["description"],
            "date": c["date"],
            "authors": [{"user": "builder-hub"}],
        }
        for c in history
    ]
