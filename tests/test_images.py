"""Safe decoding: content sniffing, header-only pixel cap, EXIF orientation, every mode to RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from aigd.errors import CorruptImage, ImageRejected, ImageTooLarge, UnsupportedMediaType, http_status
from aigd.config import DecodeLimits
from aigd.dev.demo_data import png_header_bomb
from aigd.images import decode
from helpers import image_bytes as _bytes


def test_declared_30000_squared_png_is_refused_from_the_header():
    data = png_header_bomb(30000)
    assert len(data) < 300
    with pytest.raises(ImageTooLarge) as e:
        decode(data)
    assert http_status(e.value) == 422


def test_random_bytes_and_truncated_jpeg():
    with pytest.raises(UnsupportedMediaType) as e:
        decode(np.random.default_rng(0).bytes(500))
    assert http_status(e.value) == 415
    jpeg = _bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(CorruptImage):
        decode(jpeg[: len(jpeg) // 2])


def test_geometry_limits():
    with pytest.raises(ImageRejected, match="minimum side"):
        decode(_bytes(Image.new("RGB", (10, 64)), "PNG"))
    with pytest.raises(ImageRejected, match="aspect"):
        decode(_bytes(Image.new("RGB", (3000, 30)), "PNG"), DecodeLimits(max_aspect=50))


def test_modes_are_converted_correctly():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red -> white
    assert decode(_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    g16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))  # half scale, must not clamp to 255
    assert abs(decode(_bytes(g16, "PNG")).getpixel((0, 0))[0] - 128) <= 1
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    r, g, b = decode(_bytes(cmyk, "JPEG")).getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60
    pal = Image.new("P", (32, 32), 0)
    assert decode(_bytes(pal, "GIF")).mode == "RGB"


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (32, 64)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("P", (32, 32), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode(buf.getvalue())
    assert out.size == (32, 32) and out.mode == "RGB"


@pytest.mark.parametrize("name", sorted(__import__("bench.hostile_inputs", fromlist=["CASES"]).CASES))
def test_hostile_inputs_inside_the_byte_caps_get_their_documented_answer(name):
    """CPU and memory bombs are refused from the header or the file's structure; real-looking large or
    odd images (16-bit, broken EXIF, 48 MP camera JPEG) decode to the policy's grid."""
    from bench.hostile_inputs import CASES

    from aigd.config import ImagePolicy
    from aigd.errors import AigdError
    from aigd.image_view import prepare, target_size

    make, expected = CASES[name]
    data = make()
    assert len(data) < 3 * 2**20
    if expected == "ok":
        pixels = prepare(data, DecodeLimits.preset("serving"), ImagePolicy())
        h, w, _ = pixels.shape
        assert target_size(w, h, ImagePolicy()) == (w, h) and pixels.dtype == np.uint8
    else:
        with pytest.raises(AigdError) as e:
            prepare(data, DecodeLimits.preset("serving"), ImagePolicy())
        assert e.value.code == expected and 400 <= http_status(e.value) < 500


def test_decoding_at_the_policy_size_matches_a_full_decode_closely():
    """The reduced decode (JPEG DCT scaling, box reduction) is what the model sees everywhere; it must
    stay close to resizing the full-size image."""
    from aigd.config import ImagePolicy
    from aigd.image_view import prepare, prepare_image

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((1600, 1200),
                                                                                    Image.Resampling.BICUBIC)
    policy = ImagePolicy(max_pixels=140 * 140)
    for fmt in ("PNG", "JPEG"):
        data = _bytes(img, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        reduced = prepare(data, DecodeLimits(), policy).astype(np.float32)
        full = prepare_image(decode(data), policy).astype(np.float32)
        assert reduced.shape == full.shape
        assert np.abs(reduced - full).mean() < 3.0, fmt


def test_image_limits_name_the_format_cap():
    from bench.hostile_inputs import jpeg_48mp

    data = jpeg_48mp()
    decode(data, DecodeLimits(), model_size=lambda w, h: (512, 384))  # JPEG: the large cap
    with pytest.raises(ImageTooLarge, match="JPEG"):
        decode(data, DecodeLimits(max_jpeg_pixels=20_000_000))
    with pytest.raises(ImageTooLarge, match="PNG"):
        decode(png_header_bomb(4500))  # 20.25 MP: above the 16.7 MP full-decode cap


@pytest.mark.parametrize("name", sorted(__import__("bench.hostile_inputs", fromlist=["MISSING_PIXELS"]).MISSING_PIXELS))
def test_missing_pixel_data_is_corrupt_at_every_decode_scale(name):
    """Full size (augmentation, evaluation perturbations), the policy's reduced scale (serving,
    scoring, training) and a tiny policy that forces the smallest DCT scale all refuse it."""
    from bench.hostile_inputs import MISSING_PIXELS

    from aigd.config import ImagePolicy
    from aigd.image_view import prepare

    data = MISSING_PIXELS[name]()
    with pytest.raises(CorruptImage):
        decode(data)
    for policy in (ImagePolicy(), ImagePolicy(min_pixels=56 * 56, max_pixels=56 * 56)):
        with pytest.raises(CorruptImage):
            prepare(data, DecodeLimits.preset("serving"), policy)
