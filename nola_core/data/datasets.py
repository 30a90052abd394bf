"""A torch Dataset over manifest records that survives files vanishing mid-run.

Hours of feature extraction or tuning must not die because a user deleted or overwrote one
image after the manifest was built: such an item comes back as None, is logged, and the
collate function drops it and reports its index.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from nola_core.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_rgb
from nola_core.data.manifest import ImageRecord

logger = logging.getLogger("nola_core.data")

Item = torch.Tensor | tuple[torch.Tensor, ...]


class ManifestImageDataset(Dataset):
    """Yields (transform(image), index), or (None, index) when the file cannot be used now.

    With `check_content` (default) the bytes are hashed and compared with the record's id, so
    a file replaced by a different picture at the same path is reported instead of silently
    feeding features of the wrong image under the old id. `decode_min_side`: see `load_rgb`'s
    `min_side` (for transforms that resize the shorter side to it first).
    """

    def __init__(
        self,
        root: Path,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], Item],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        check_content: bool = True,
        decode_min_side: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.records = records
        self.transform = transform
        self.max_pixels = max_pixels
        self.check_content = check_content
        self.decode_min_side = decode_min_side

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Item | None, int]:
        record = self.records[index]
        path = self.root / record.path
        try:
            data = path.read_bytes()
            if self.check_content and hashlib.sha256(data).hexdigest() != record.image_id:
                logger.warning("%s: content changed since the manifest was built; skipped", path)
                return None, index
            image = load_rgb(path, self.max_pixels, data=data, min_side=self.decode_min_side)
        except (OSError, ImageLoadError) as error:
            logger.warning("%s: cannot be loaded now, skipped (%s)", path, error)
            return None, index
        return self.transform(image), index


def collate_skipping_failures(
    batch: Sequence[tuple[Item | None, int]],
) -> tuple[Item | None, torch.Tensor, list[int]]:
    """Stack the items that loaded; return (images, their indices, failed indices).

    Tuple items (several views) are stacked view by view. When every item failed, images is
    None and indices is empty, so callers can skip the batch and still report the failures.
    """
    loaded = [(item, index) for item, index in batch if item is not None]
    failed = [index for item, index in batch if item is None]
    indices = torch.tensor([index for _, index in loaded], dtype=torch.long)
    if not loaded:
        return None, indices, failed
    items = [item for item, _ in loaded]
    if isinstance(items[0], tuple):
        images: Item = tuple(torch.stack(views) for views in zip(*items))
    else:
        images = torch.stack(items)
    return images, indices, failed
