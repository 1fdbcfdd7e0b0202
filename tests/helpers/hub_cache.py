"""Build a Hugging Face Hub cache folder exactly as huggingface_hub lays it out, without network."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_repo_to_cache(cache_dir: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Copy ``folder``'s files into ``cache_dir`` as blobs + a snapshot + a ref; return the snapshot."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode() + b"@" + revision.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(Path("../" * (len(file.relative_to(folder).parts) + 1)) / "blobs" / blob.name)
    return snapshot
