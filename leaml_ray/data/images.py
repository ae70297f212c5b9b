"""Image loading for the prepare stage: decode, turn upright by EXIF, tile clip frames, shrink what is over the pixel
limit."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ORIENTATION = 0x0112  # the EXIF tag


class ImageProblem(Exception):
    """An image that cannot be used; args = (reason, detail)."""


def decode(data: bytes) -> Image.Image:
    """A fully decoded PIL image, or ImageProblem."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageProblem("undecodable_image", f"{type(e).__name__}: {e}"[:200]) from None


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tile(frames: list[Image.Image]) -> Image.Image:
    """Frames side by side in a near-square grid (an MLLM sees a clip as one image)."""
    cols = math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / cols)
    w, h = frames[0].size
    sheet = Image.new("RGB", (cols * w, rows * h))
    for k, frame in enumerate(frames):
        sheet.paste(frame.convert("RGB").resize((w, h)), ((k % cols) * w, (k // cols) * h))
    return sheet


def _read_frames(folder: str, count: int) -> Image.Image:
    import pyarrow.fs as pafs

    from leaml_ray import storage

    fs, p = storage.filesystem(folder)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(p)) if i.path.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ImageProblem("missing_image", f"no frames in {folder}")
    picks = [files[round(k * (len(files) - 1) / max(1, count - 1))] for k in range(min(count, len(files)))]
    frames = []
    for f in dict.fromkeys(picks):
        with fs.open_input_stream(f) as s:
            frames.append(decode(s.read()))
    return tile(frames)


def load(
    data: bytes | None, path: str | None, max_pixels: int, frames_per_clip: int
) -> tuple[bytes, int, int, str | None]:
    """(encoded bytes, width, height, note) of a usable image; the note says when it was resized."""
    import pyarrow.fs as pafs  # here, not at the top: the training core (gpu_smoke) imports this module without pyarrow

    from leaml_ray import storage

    img = None
    if data is None:
        if not path:
            raise ImageProblem("missing_image", "no image bytes and no path")
        fs, p = storage.filesystem(path)
        kind = fs.get_file_info(p).type
        if kind == pafs.FileType.Directory:
            img = _read_frames(path, frames_per_clip)
            data = encode_png(img)
        elif kind == pafs.FileType.File:
            with fs.open_input_stream(p) as s:
                data = s.read()
        else:
            raise ImageProblem("missing_image", f"{path} does not exist")
    img = img or decode(data)
    notes = []
    # a phone photo is stored sideways with an EXIF tag saying how to turn it; models get it the way a viewer shows it
    try:
        orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: the pixels are fine, shown as stored (as viewers do)
        orientation = 1
    if orientation in range(2, 9):  # 1 is upright; other values are not orientations
        img = ImageOps.exif_transpose(img)
        notes.append(f"turned upright (EXIF orientation {orientation})")
    w, h = img.size
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        img = img.convert("RGB").resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
        notes.append(f"resized {w}x{h} -> {img.width}x{img.height}")
    # encoded once, and only when the pixels changed: an unchanged image keeps its own bytes
    return (encode_png(img) if notes else data), img.width, img.height, "; ".join(notes) or None
