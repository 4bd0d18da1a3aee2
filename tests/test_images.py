"""sgmft.ingest.images: every exotic mode -> RGB, EXIF rotation applied, bad files -> ImageLoadError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sgmft.ingest.images import ImageLoadError, image_bytes_digest, load_image


def _rgb(im):
    assert im.mode == "RGB"
    return np.asarray(im)


def test_plain_rgb_roundtrip(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (7, 5), (10, 20, 30)).save(p)
    a = _rgb(load_image(p))
    assert a.shape == (5, 7, 3) and (a == (10, 20, 30)).all()


def test_palette_and_palette_transparency(tmp_path):
    p = tmp_path / "p.png"
    Image.new("RGB", (8, 8), (204, 0, 0)).convert("P").save(p)  # 204 is in the web palette
    assert Image.open(p).mode == "P"
    assert tuple(_rgb(load_image(p))[0, 0]) == (204, 0, 0)
    # palette GIF with a transparent index -> composited on white
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    q = tmp_path / "t.gif"
    im.save(q, transparency=0)
    a = _rgb(load_image(q))
    assert tuple(a[0, 0]) == (0, 255, 0) and tuple(a[1, 1]) == (255, 255, 255)


def test_rgba_and_la_composite_on_white(tmp_path):
    p = tmp_path / "a.png"
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    im.save(p)
    a = _rgb(load_image(p))
    assert tuple(a[0, 0]) == (0, 0, 255) and tuple(a[3, 3]) == (255, 255, 255)
    q = tmp_path / "la.png"
    Image.new("LA", (3, 3), (0, 128)).save(q)
    v = _rgb(load_image(q))[0, 0]
    assert 120 <= v[0] <= 135 and v[0] == v[1] == v[2]  # half black on white = grey


def test_cmyk_gray_and_bilevel(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p)  # red in CMYK
    r, g, b = _rgb(load_image(p))[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60
    q = tmp_path / "g.png"
    Image.new("L", (5, 5), 77).save(q)
    assert tuple(_rgb(load_image(q))[0, 0]) == (77, 77, 77)
    s = tmp_path / "one.png"
    Image.new("1", (5, 5), 1).save(s)
    assert tuple(_rgb(load_image(s))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_rescaled(tmp_path, mode):
    a = np.zeros((4, 6), dtype=np.float64)
    a[:, 3:] = 60000.0  # right half bright in a 16-bit range
    dt = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    im = Image.fromarray(a.astype(dt))
    assert im.mode == mode
    p = tmp_path / ("x.png" if mode == "I;16" else "x.tif")
    im.save(p)
    assert Image.open(p).mode == mode
    out = _rgb(load_image(p))
    assert out.shape == (4, 6, 3)
    assert (out[:, :3] == 0).all() and (out[:, 3:] == 255).all()


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as im:
        assert im.n_frames == 3
    r, g, b = _rgb(load_image(p))[3, 3].astype(int)
    assert r > 200 and b < 50


def test_exif_orientation_applied(tmp_path):
    # 20 wide x 10 high; left half red, right half blue; EXIF 6 = "rotate 90 CW to view"
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    im.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = _rgb(load_image(p))
    assert out.shape == (20, 10, 3)  # upright: now 10 wide x 20 high
    top, bottom = out[2, 5].astype(int), out[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 60       # after 90 deg CW, the left (red) half is on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_bad_files_raise_imageloaderror(tmp_path):
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(zero)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(text)
    good = tmp_path / "good.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(good, quality=90)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as ei:
        load_image(trunc)
    assert ei.value.path == trunc and "truncated" in ei.value.reason
    corrupt = tmp_path / "corrupt.png"
    png = tmp_path / "ok.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png)
    b = bytearray(png.read_bytes())
    b[60:80] = b"\x00" * 20  # smash IDAT data / CRC
    corrupt.write_bytes(bytes(b))
    with pytest.raises(ImageLoadError):
        load_image(corrupt)
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bomb_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(p)  # 9 Mpx, compresses to a few KB
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(p, max_pixels=1_000_000)
    assert load_image(p, max_pixels=10_000_000).size == (3000, 3000)


def test_pil_bomb_error_is_caught(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("L", (400, 400)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL raises above 2x this
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(p, max_pixels=10**9)


def test_digest_stable_and_content_based(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"xyz")
    b.write_bytes(b"xyz")
    assert image_bytes_digest(a) == image_bytes_digest(b)
    b.write_bytes(b"xy")
    assert image_bytes_digest(a) != image_bytes_digest(b)
