"""Data: the DataModule (`ImageFolderData`, configs name it ``tl_cli.data.ImageFolderData``), the
folders it reads, decoding and transforms, screening bad images, the first pass and its caches.

`ImageFolderData` is imported on first use, so modules here that need no torch or Lightning
(`folders`, `images`, `screening`) stay cheap for `tl data check`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tl_cli.data.module import ImageFolderData

__all__ = ["ImageFolderData"]


def __getattr__(name: str) -> Any:
    if name == "ImageFolderData":
        from tl_cli.data.module import ImageFolderData

        return ImageFolderData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
