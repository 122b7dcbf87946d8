"""Images from a folder, and the image preparation every diffax source shares.

A folder is either flat (images at the top level, unlabeled) or holds one
subfolder per class, the same convention as torchvision's `ImageFolder` and the
`imagefolder` loader behind diffusers' training scripts:

        flowers/                     pets/
            0001.jpg                     cat/  a.png b.jpg ...
            0002.png                     dog/  c.webp ...
            ...                          (labels: cat=0, dog=1, sorted by name)

Captions, for text-conditioned training, are read as diffusers' training scripts read them: a
`metadata.jsonl` at the top of the folder (one JSON object per line, `file_name` relative to the folder and
the caption in `caption_column`, by default 'text' or else 'caption'), or a `.txt` file beside each image
(`0001.jpg` -> `0001.txt`). Either way every image needs its caption. For ControlNet training, metadata.jsonl
also names each image's conditioning image (an edge map, a pose, a depth map) in `conditioning_column`
(diffusers' `conditioning_image`), a file relative to the folder, prepared as the image is but always RGB.

Every image is center-cropped to a square and then resized to `image_size`,
which is what diffusers' train scripts do with `--center_crop` (they resize the
short side first and crop after; cropping first gives the same picture and
resizes fewer pixels).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
METADATA_FILE = 'metadata.jsonl'
CAPTION_COLUMNS = ('text', 'caption')  # tried in this order when no caption column is named


def prepare_image(image: Image.Image | np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Center-crops to a square, resizes and converts to `channels`.

    Args:
        image: a PIL image in any mode, or a uint8 array [H, W], [H, W, 1], [H, W, 3]
            or [H, W, 4].
        image_size: side of the square output.
        channels: 1 (grayscale) or 3 (RGB).

    Returns:
        uint8 array [image_size, image_size, channels].
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert('L' if channels == 1 else 'RGB')
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        # Bicubic: sharper strokes than bilinear when upsampling tiny images, less
        # ringing than Lanczos; PIL widens the filter when downsampling, so large
        # photos are antialiased rather than aliased.
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, np.uint8)
    return array[..., None] if channels == 1 else array  # [S, S, C]


def _is_image(path: pathlib.Path) -> bool:
    # Dot files are skipped: macOS litters folders with `._name.jpg` metadata.
    return path.is_file() and not path.name.startswith('.') and path.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
    paths = folder.rglob('*') if recursive else folder.iterdir()
    return sorted(p for p in paths if _is_image(p))


class FolderSource:
    """A grain random-access source over the images in a folder.

    Records are `{'image': uint8 [S, S, C], 'label': int64 scalar}`, plus `'caption'` (a str) when the
    folder has captions, and `'conditioning_image'` (uint8 [S, S, 3]) with a conditioning column. Images are
    decoded on access, so the folder may be far larger than memory.
    """

    def __init__(self, path: str | pathlib.Path, *, image_size: int, channels: int, caption_column: str = '',
                 conditioning_column: str = ''):
        """Scans `path` for images.

        Args:
            path: the folder: flat (unlabeled, label 0) or one subfolder per class
                (images found anywhere below a class subfolder; classes sorted by name).
            image_size: side of the square output images.
            channels: 1 or 3.
            caption_column: the caption key of metadata.jsonl ('': 'text', else 'caption').
            conditioning_column: the metadata.jsonl key naming each image's conditioning image ('': none).

        Raises:
            ValueError: the folder does not exist, holds no images, or mixes loose
                images with class subfolders; an image without a caption in a folder
                with captions; a metadata.jsonl line that does not parse.
        """
        self.path = pathlib.Path(path).expanduser()
        self.image_size = image_size
        self.channels = channels
        if not self.path.is_dir():
            raise ValueError(f'data folder {str(self.path)!r} does not exist or is not a directory')
        # name -> conditioning image file; those files are inputs, not training images
        control = _read_conditioning(self.path, conditioning_column) if conditioning_column else {}
        inputs = {f.resolve() for f in control.values()}
        loose = [p for p in _list_images(self.path, recursive=False) if p.resolve() not in inputs]
        classes = {}
        for sub in sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith('.')):
            images = [p for p in _list_images(sub, recursive=True) if p.resolve() not in inputs]
            if images:
                classes[sub.name] = images
        if loose and classes:
            raise ValueError(
                f'data folder {str(self.path)!r} mixes {len(loose)} loose images (e.g. {loose[0].name!r}) '
                f'with class subfolders {sorted(classes)}; put every image in a class subfolder, '
                'or use a flat folder')
        if not loose and not classes:
            raise ValueError(
                f'data folder {str(self.path)!r} holds no images (looked for '
                f'{", ".join(IMAGE_EXTENSIONS)}, any case, at the top level and in class subfolders)')
        self.class_names: list[str] = list(classes)
        self.num_classes: int = len(classes)
        if classes:
            self._items = [(p, label) for label, name in enumerate(classes) for p in classes[name]]
        else:
            self._items = [(p, 0) for p in loose]
        self.captions: list[str] | None = _read_captions(self.path, [p for p, _ in self._items], caption_column)
        self.conditioning: list[pathlib.Path] | None = None
        if conditioning_column:
            names = [p.relative_to(self.path).as_posix() for p, _ in self._items]
            missing = next((n for n in names if n not in control), None)
            if missing is not None:
                raise ValueError(f'{self.path / METADATA_FILE}: no line with file_name {missing!r}; every image needs '
                                 f'a conditioning image (data.conditioning_column={conditioning_column!r})')
            self.conditioning = [control[n] for n in names]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path, label = self._items[index]
        record = {'image': _decode(path, self.image_size, self.channels), 'label': np.int64(label)}
        if self.captions is not None:
            record['caption'] = self.captions[index]
        if self.conditioning is not None:
            record['conditioning_image'] = _decode(self.conditioning[index], self.image_size, 3)
        return record

    def __repr__(self) -> str:
        return (f'FolderSource(path={str(self.path)!r}, num_records={len(self)}, '
                f'num_classes={self.num_classes}, image_size={self.image_size}, channels={self.channels})')


def _read_captions(folder: pathlib.Path, images: list[pathlib.Path], column: str) -> list[str] | None:
    """Each image's caption from `folder/metadata.jsonl` or the .txt files beside the images; None when the
    folder has neither."""
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        by_name = {}
        for number, row in _metadata_rows(metadata):
            keys = (column,) if column else CAPTION_COLUMNS
            key = next((k for k in keys if isinstance(row, dict) and k in row), None)
            if key is None or 'file_name' not in row or not isinstance(row[key], str):
                raise ValueError(f"{metadata}: line {number} needs 'file_name' and a string caption under "
                                 f"{' or '.join(repr(k) for k in keys)} (data.caption_column)")
            by_name[pathlib.PurePosixPath(row['file_name']).as_posix()] = row[key]
        captions = []
        for image in images:
            name = image.relative_to(folder).as_posix()
            if name not in by_name:
                raise ValueError(f"{metadata}: no line with file_name {name!r}; every image needs a caption")
            captions.append(by_name[name])
        return captions
    texts = [image.with_suffix('.txt') for image in images]
    if not any(t.is_file() for t in texts):
        return None
    missing = next((t for t in texts if not t.is_file()), None)
    if missing is not None:
        raise ValueError(f'caption file {str(missing)!r} missing: in a folder with .txt captions every image '
                         'needs one')
    return [t.read_text(encoding='utf-8').strip() for t in texts]


def _metadata_rows(metadata: pathlib.Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line of a `metadata.jsonl`; ValueError naming the file and
    the line that is not JSON."""
    for number, line in enumerate(metadata.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f'{metadata}: line {number} is not JSON ({e})') from None


def _decode(path: pathlib.Path, image_size: int, channels: int) -> np.ndarray:
    """`prepare_image` of an image file; ValueError naming the file when it does not decode."""
    try:
        with Image.open(path) as image:
            return prepare_image(image, image_size, channels)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError.
        raise ValueError(f'cannot decode image file {str(path)!r}: {e}') from e


def _read_conditioning(folder: pathlib.Path, column: str) -> dict[str, pathlib.Path]:
    """{image file_name: its conditioning image file} from the `column` of `folder/metadata.jsonl`."""
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise ValueError(f"{metadata}: missing; data.conditioning_column={column!r} names each image's "
                         f"conditioning image in it")
    by_name = {}
    for number, row in _metadata_rows(metadata):
        if not isinstance(row, dict) or 'file_name' not in row or not isinstance(row.get(column), str):
            raise ValueError(f"{metadata}: line {number} needs 'file_name' and a file name under {column!r} "
                             f"(data.conditioning_column)")
        file = folder / row[column]
        if not file.is_file():
            raise ValueError(f'{metadata}: line {number}: {column} {row[column]!r} is not a file in {str(folder)!r}')
        by_name[pathlib.PurePosixPath(row['file_name']).as_posix()] = file
    return by_name
