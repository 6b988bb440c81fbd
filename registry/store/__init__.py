"""Content-addressed artifact storage: a Protocol, a local and an S3-compatible implementation."""

from registry.store.base import ArtifactStore
from registry.store.digest import tree_digest
from registry.store.local import LocalArtifactStore
from registry.store.s3 import S3ArtifactStore

__all__ = ["ArtifactStore", "LocalArtifactStore", "S3ArtifactStore", "tree_digest"]
