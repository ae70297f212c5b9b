"""Image loading: a photo stored sideways with an EXIF orientation is turned upright; what was not changed keeps its
bytes; the pixel limit applies to the upright image."""

import io

from PIL import Image

from leaml_ray.data.images import ORIENTATION, decode, load


def _sideways_jpeg(orientation: int) -> bytes:
    """40x20 pixels as stored: red left half, blue right half; the EXIF tag says how a viewer turns it."""
    img = Image.new("RGB", (40, 20), (220, 30, 30))
    img.paste((30, 30, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_an_exif_rotated_photo_is_turned_upright():
    data, w, h, note = load(_sideways_jpeg(6), None, max_pixels=10_000, frames_per_clip=1)
    assert (w, h) == (20, 40) and note == "turned upright (EXIF orientation 6)"
    upright = decode(data).convert("RGB")
    assert upright.size == (20, 40) and ORIENTATION not in upright.getexif()
    red, blue = upright.getpixel((10, 8)), upright.getpixel((10, 32))  # 6: the stored left side is on top
    assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0]


def test_an_upright_photo_keeps_its_bytes_and_the_limit_applies_after_turning():
    stored = _sideways_jpeg(1)
    assert load(stored, None, max_pixels=10_000, frames_per_clip=1) == (stored, 40, 20, None)
    _, w, h, note = load(_sideways_jpeg(8), None, max_pixels=200, frames_per_clip=1)
    assert (w, h) == (10, 20) and note == "turned upright (EXIF orientation 8); resized 20x40 -> 10x20"
    stored = _sideways_jpeg(42)  # not an orientation: the image as stored
    assert load(stored, None, max_pixels=10_000, frames_per_clip=1) == (stored, 40, 20, None)
