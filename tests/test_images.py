import numpy as np
import pytest
from PIL import Image

from defect_tune.data.images import decode, fit_image, to_gray_uint8
from defect_tune.data.readers import Item, Region


def item(labels=(), regions=(), path=None):
    return Item(id="x", path=path, labels=tuple(labels), regions=tuple(regions))


def test_pad_keeps_the_aspect_ratio_and_centres_on_black():
    pixels = np.full((50, 100), 200, dtype=np.uint8)
    (out,) = fit_image(item(), pixels, 40, "pad")
    assert out.pixels.shape == (40, 40)
    assert (out.pixels[:10] == 0).all() and (out.pixels[30:] == 0).all()  # 20 rows of image, centred
    assert (out.pixels[10:30] == 200).all()


def test_keep_scales_the_height_and_keeps_the_width_ratio():
    (out,) = fit_image(item(), np.zeros((256, 1600), np.uint8), 64, "keep")
    assert out.pixels.shape == (64, 400)


def test_squash_only_when_asked():
    (out,) = fit_image(item(), np.zeros((256, 1600), np.uint8), 64, "squash")
    assert out.pixels.shape == (64, 64)


def severstal_rle(height, columns):
    """A run covering whole columns [a, b) of a column-major frame, Severstal style (1-based)."""
    a, b = columns
    return f"{a * height + 1} {(b - a) * height}"


def test_tiles_cover_the_frame_and_take_labels_from_masks():
    height, width = 32, 200
    pixels = np.arange(height * width, dtype=np.uint32).reshape(height, width).astype(np.uint8)
    regions = [Region("class_1", rle=severstal_rle(height, (5, 10))),
               Region("class_3", rle=severstal_rle(height, (190, 200)))]
    tiles = fit_image(item(["class_1", "class_3"], regions), pixels, 32, "tile")
    # 200 px wide at height 32: tiles start at 0, 32, ..., 160, plus one flush with the right edge.
    assert [t.suffix for t in tiles] == [f"#t{k}" for k in range(7)]
    assert all(t.pixels.shape == (32, 32) for t in tiles)
    assert np.array_equal(tiles[-1].pixels, pixels[:, 168:200])
    assert [t.labels for t in tiles] == [("class_1",), (), (), (), (), ("class_3",), ("class_3",)]


def test_tile_labels_from_voc_boxes_after_scaling():
    pixels = np.zeros((100, 400), np.uint8)
    regions = [Region("crack", box=(330, 10, 340, 20))]  # source columns 329..339
    tiles = fit_image(item(["crack"], regions), pixels, 50, "tile")  # scale 0.5: 4 tiles of 100 source px
    assert [t.labels for t in tiles] == [(), (), (), ("crack",)]


def test_tile_refuses_labels_without_locations():
    with pytest.raises(ValueError, match="location"):
        fit_image(item(["crack"]), np.zeros((10, 40), np.uint8), 10, "tile")


def test_rle_is_column_major_and_checked_against_the_frame(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 8), np.uint8)).save(path)
    good = item(["c"], [Region("c", rle="1 4")], path)  # exactly the first column
    tiles = decode(good, 4, "tile").outputs
    assert [t.labels for t in tiles] == [("c",), ()]
    with pytest.raises(ValueError, match="runs past"):
        decode(item(["c"], [Region("c", rle="30 4")], path), 4, "keep")


def test_sixteen_bit_images_keep_their_range():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert to_gray_uint8(image).tolist() == [[0, 128, 255]]


def test_rgb_becomes_grayscale_and_decode_hashes_the_file(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    result = decode(item(path=path), 8, "pad")
    assert result.outputs[0].pixels.dtype == np.uint8 and (result.outputs[0].pixels == 90).all()
    copy = tmp_path / "copy.png"
    copy.write_bytes(path.read_bytes())
    assert decode(item(path=copy), 8, "pad").content_hash == result.content_hash


def test_corrupt_image_raises(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(OSError):
        decode(item(path=path), 8, "pad")


@pytest.mark.parametrize("side", [12, 20])  # over PIL's limit (a warning), and over twice it (an error)
def test_an_oversized_image_is_a_reason_not_a_crash(tmp_path, monkeypatch, side):
    from defect_tune.data.images import decode_or_reason

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's real guard, scaled down
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((side, side), np.uint8)).save(path)
    reason = decode_or_reason((item(path=path), 8, "pad"))
    assert isinstance(reason, str) and reason.startswith("cannot decode image: too many pixels for a defect image")


def test_a_12_bit_frame_in_a_16_bit_png_keeps_its_grey_levels():
    """A 12-bit sensor fills 0..4095 of a 16-bit PNG: scaled by its bit depth (4095), not 65535,
    which left it about 16 grey levels."""
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    gray = to_gray_uint8(Image.fromarray(ramp))
    assert gray.max() == 255 and len(np.unique(gray)) == 256
    # Scaled by a bit depth, not stretched to the frame's own maximum: 3000 of 4095 stays 187.
    dim = to_gray_uint8(Image.fromarray(np.minimum(ramp, 3000).astype(np.uint16)))
    assert dim.max() == round(3000 * 255 / 4095)


def test_a_stated_bit_depth_scales_every_frame_alike_and_refuses_pixels_above_it():
    """A dim 12-bit frame (brightest 1500) fits 11 bits and would be doubled by its own depth;
    with bit_depth=12 it keeps its darkness, and a pixel the sensor cannot record is refused."""
    dim = Image.fromarray(np.full((4, 4), 1500, dtype=np.uint16))
    assert to_gray_uint8(dim).max() == round(1500 * 255 / 2047)
    assert to_gray_uint8(dim, bit_depth=12).max() == round(1500 * 255 / 4095)
    with pytest.raises(ValueError, match="brightest pixel 5000 is above the 12-bit range"):
        to_gray_uint8(Image.fromarray(np.full((4, 4), 5000, dtype=np.uint16)), bit_depth=12)


def test_a_float_image_with_a_nan_pixel_is_refused_with_the_count():
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[2, 3] = np.nan
    with pytest.raises(ValueError, match="1 non-finite pixel"):
        to_gray_uint8(Image.fromarray(pixels, mode="F"))
