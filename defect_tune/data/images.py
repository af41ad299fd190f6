"""Decode an image once, to 8-bit grayscale at the dataset's size, without distorting it.

Fits (how a source image becomes the stored one):
- `pad`: scale the longest side to `size`, centre it on a black `size` x `size` square. A
  square source is simply resized. Default for every format but Severstal.
- `keep`: scale the height to `size` and keep the aspect ratio (Severstal 256x1600 at 128 ->
  128x800). Every image of a dataset must then share one aspect ratio.
- `tile`: scale the short side to `size` and cut `size` x `size` tiles along the long side, the
  last one flush with the edge (overlapping its neighbour) so no pixel is lost. Each tile gets
  the labels of the defects (VOC boxes, Severstal masks) that reach into it.
- `squash`: resize to `size` x `size`, distorting the aspect ratio. Only when asked for.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from defect_tune.data.choices import FITS
from defect_tune.data.files import file_problem
from defect_tune.data.readers import Item, Region

# The largest --image-size: far above any defect image a CPU-side pipeline streams; above it a typo
# (50000) would ask for gigabytes per image before the first decode. predict holds model.json to it too.
MAX_IMAGE_SIZE = 8192


@dataclass(frozen=True)
class Decoded:
    """One stored image (or one tile of a source image)."""

    suffix: str  # "" for a whole image, "#t3" for the fourth tile
    pixels: np.ndarray  # uint8, (height, width)
    labels: tuple[str, ...]


@dataclass(frozen=True)
class DecodeResult:
    content_hash: str  # sha256 of the file's bytes: exact duplicates share it
    source_shape: tuple[int, int]
    outputs: tuple[Decoded, ...]
    bit_depth: int | None = None  # what a deeper-than-8-bit integer image was scaled by


DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # integer images deeper than 8 bits
BIT_DEPTHS = range(9, 33)  # what --bit-depth may say a deeper sensor records


def to_gray_uint8(image: Image.Image, bit_depth: int | None = None) -> np.ndarray:
    """8-bit grayscale, keeping a deeper image's full range (scaled, not clipped); see `gray`."""
    return gray(image, bit_depth)[0]


def gray(image: Image.Image, bit_depth: int | None = None) -> tuple[np.ndarray, int | None]:
    """8-bit grayscale and, for an integer image deeper than 8 bits, the bit depth it was scaled by.

    A 12-bit sensor's frame in a 16-bit PNG uses 0..4095; dividing it by 65535 would leave it
    about 16 grey levels. With `bit_depth` (prepare's --bit-depth) every such image is scaled by
    it, and a pixel above its range is refused. Without, by the smallest whole bit depth that holds
    the image's brightest pixel: a bit depth, not the maximum itself, so that a dim frame keeps
    most of its darkness; prepare counts the depths it used, since a frame dim enough to fit a
    smaller one is still brightened (--bit-depth says the sensor's once for all).
    A float image is stretched over its own range; a non-finite pixel is refused (ValueError),
    since one NaN would otherwise turn the whole image black."""
    if image.mode in DEEP_MODES:
        array = np.asarray(image, dtype=np.float64)
        brightest = max(float(array.max()), 255.0)
        depth = bit_depth or int(np.ceil(np.log2(brightest + 1)))
        if brightest > 2.0 ** depth - 1:
            raise ValueError(f"brightest pixel {brightest:.0f} is above the {depth}-bit range set by prepare "
                             f"--bit-depth {depth}")
        return np.clip(np.rint(array * (255.0 / (2.0 ** depth - 1))), 0, 255).astype(np.uint8), depth
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise ValueError(f"{bad} non-finite pixel(s) (NaN or infinity) in a floating-point image")
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.rint((array - low) * scale).astype(np.uint8), None
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8), None


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    if pixels.shape == (height, width):
        return pixels
    # PIL's bilinear widens its kernel when shrinking, so thin cracks are averaged, not skipped.
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))


def _rle_mask(rle: str, height: int, width: int) -> np.ndarray:
    try:
        numbers = np.array(rle.split(), dtype=np.int64)
    except OverflowError:  # readers.check_rle refuses these first; a Region built by hand may not
        raise ValueError("EncodedPixels holds a number too large for any image") from None
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts + lengths).max(initial=0) > height * width:
        raise ValueError(f"EncodedPixels runs past the {height}x{width} image")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(starts, lengths):
        flat[start : start + length] = True
    return flat.reshape(width, height).T  # Severstal counts down columns first


def _coverage(region: Region, height: int, width: int, along_width: bool) -> np.ndarray:
    """Which source columns (or rows) a defect touches, for tile labels."""
    length = width if along_width else height
    covered = np.zeros(length, dtype=bool)
    if region.box is not None:
        xmin, ymin, xmax, ymax = region.box
        if xmax < 1 or ymax < 1 or xmin > width or ymin > height or xmin > xmax or ymin > ymax:
            # Negative ends would wrap around in the slice below and label the wrong tiles.
            raise ValueError(f"{region.label} box {region.box} lies outside the {width}x{height} image")
        low, high = (xmin, xmax) if along_width else (ymin, ymax)
        covered[max(low - 1, 0) : min(high, length)] = True  # a box reaching past an edge stops there
    elif region.rle is not None:
        covered = _rle_mask(region.rle, height, width).any(axis=0 if along_width else 1)
    return covered


def _tiles(item: Item, pixels: np.ndarray, size: int) -> tuple[Decoded, ...]:
    height, width = pixels.shape
    unlocated = set(item.labels) - {region.label for region in item.regions}
    if unlocated:
        raise ValueError(
            f"--fit tile needs every defect's location (VOC box or Severstal mask); none for {sorted(unlocated)}"
        )
    along_width = width >= height
    scale = size / (height if along_width else width)
    scaled = _resize(pixels, size, max(size, round(width * scale))) if along_width else _resize(
        pixels, max(size, round(height * scale)), size
    )
    long_side = scaled.shape[1] if along_width else scaled.shape[0]
    starts = list(range(0, long_side - size + 1, size))
    if starts[-1] + size < long_side:
        starts.append(long_side - size)
    coverage = [(r.label, _coverage(r, height, width, along_width)) for r in item.regions]
    tiles = []
    for index, start in enumerate(starts):
        tile = scaled[:, start : start + size] if along_width else scaled[start : start + size, :]
        # The tile's span in source pixels, widened to whole pixels so edge-touching defects count.
        low, high = int(np.floor(start / scale)), int(np.ceil((start + size) / scale))
        labels = sorted({label for label, covered in coverage if covered[low:high].any()})
        tiles.append(Decoded(f"#t{index}", np.ascontiguousarray(tile), tuple(labels)))
    return tuple(tiles)


def fit_image(item: Item, pixels: np.ndarray, size: int, fit: str) -> tuple[Decoded, ...]:
    height, width = pixels.shape
    if fit == "squash":
        return (Decoded("", _resize(pixels, size, size), item.labels),)
    if fit == "keep":
        return (Decoded("", _resize(pixels, size, max(1, round(width * size / height))), item.labels),)
    if fit == "tile":
        return _tiles(item, pixels, size)
    if fit == "pad":
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        canvas = np.zeros((size, size), dtype=np.uint8)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = _resize(pixels, new_h, new_w)
        return (Decoded("", canvas, item.labels),)
    raise ValueError(f"unknown fit {fit!r}; choose one of {FITS}")


def decode(item: Item, size: int, fit: str, bit_depth: int | None = None) -> DecodeResult:
    """Read, hash, decode and fit one image. Raises OSError/ValueError with the reason."""
    data = item.path.read_bytes()
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # A decompression-bomb warning is an error here: such a file is not a defect image.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels, depth = gray(image, bit_depth)
    if min(pixels.shape) < 1:
        raise ValueError("image has no pixels")
    for region in item.regions:
        if region.rle is not None:
            _rle_mask(region.rle, *pixels.shape)  # reject runs past the frame, whatever the fit
    return DecodeResult(
        content_hash=hashlib.sha256(data).hexdigest(),
        source_shape=pixels.shape,
        outputs=fit_image(item, pixels, size, fit),
        bit_depth=depth,
    )


def decode_or_reason(job: tuple[Item, int, str] | tuple[Item, int, str, int | None]) -> DecodeResult | str:
    """`decode` for a process pool: the result, or why the image was skipped."""
    if (problem := file_problem(job[0].path)) is not None:  # a FIFO would block the read forever
        return problem
    try:
        return decode(*job)
    except FileNotFoundError:
        return "image file not found"
    except UnidentifiedImageError:
        return "cannot decode image: not a recognised image format (corrupt or not an image)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"cannot decode image: too many pixels for a defect image (PIL's decompression-bomb guard): {error}"
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three on damaged files
        return f"cannot decode image: {error}"
