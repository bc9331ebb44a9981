"""Image preprocessing: bit-for-bit parity with the Hugging Face processors (PIL backend), safe decoding of untrusted
bytes, and the mapping from a checkpoint's preprocessor_config.json."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bundle import ImagePreprocessing
from models.errors import ExportError, InvalidInput
from models.image import ImagePreprocessor, image_config_from_hf

COCO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco-mini"
CLIP = ImagePreprocessing(
    resize_mode="shortest_edge",
    size=224,
    crop_size=224,
    mean=[0.48145466, 0.4578275, 0.40821073],
    std=[0.26862954, 0.26130258, 0.27577711],
)
rng = np.random.default_rng(0)


# --- helpers ------------------------------------------------------------------------------------------------------
def hf_processor(family: str, **kwargs):
    """The slow (PIL) processor: `CLIPImageProcessorPil` in transformers 5, plain `CLIPImageProcessor` in 4."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(transformers, f"{family}ImageProcessor")
    return cls(**kwargs)


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Random pixels over a gradient, so every resampling filter has something to get wrong."""
    ramp = np.linspace(0, 120, width)[None, :, None] + np.linspace(0, 120, height)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 136, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: only a header check can judge it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def palette_image() -> Image.Image:
    image = noise(61, 47).quantize(16)
    image.info["transparency"] = 3  # one palette entry transparent, as GIFs and PNGs have
    return image


def rgba_image() -> Image.Image:
    image = noise(90, 70, "RGBA")
    image.putalpha(Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)))  # every level of alpha
    return image


def synthetic() -> list[Image.Image]:
    return [
        noise(901, 37),  # very wide
        noise(23, 517),  # very tall
        noise(7, 5),  # smaller than any crop
        noise(333, 251),  # odd sizes: odd crop offsets
        noise(250, 190, "L"),
        noise(64, 64, "1"),
        noise(120, 80, "CMYK"),
        palette_image(),
        rgba_image(),
        noise(40, 55, "LA"),
    ]


def assert_parity(hf, images: list[Image.Image]) -> None:
    ours = ImagePreprocessor(image_config_from_hf(hf.to_dict()))(images)["pixel_values"]
    ref = hf(images, return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)  # in practice bit-identical: max diff 0.0


# --- parity with transformers -------------------------------------------------------------------------------------
HF_SETTINGS = {
    "clip": ("CLIP", {}),
    "siglip": ("Siglip", {}),
    "clip-32-crop-30": ("CLIP", {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 30}}),
    "clip-crop-pads": ("CLIP", {"size": {"shortest_edge": 28}, "crop_size": {"height": 33, "width": 33}}),
    "clip-bilinear": ("CLIP", {"size": {"shortest_edge": 61}, "crop_size": {"height": 45, "width": 45}, "resample": 2}),
    "siglip-37-bilinear": ("Siglip", {"size": {"height": 37, "width": 37}, "resample": 2}),
    "siglip-nearest-no-rescale": ("Siglip", {"size": {"height": 19, "width": 19}, "resample": 0, "do_rescale": False}),
    "siglip-no-normalize": ("Siglip", {"size": {"height": 24, "width": 24}, "do_normalize": False}),
}


@pytest.mark.parametrize("setting", ["clip", "siglip"])
def test_parity_on_coco_photos(setting: str) -> None:
    images_dir = COCO / "images"
    if not images_dir.is_dir():
        pytest.skip(f"the COCO sample is not here: {images_dir}")
    family, kwargs = HF_SETTINGS[setting]
    hf = hf_processor(family, **kwargs)
    pre = ImagePreprocessor(image_config_from_hf(hf.to_dict()))
    photos = [pre.decode(p) for p in sorted(images_dir.glob("*.jpg"))[:10]]
    assert len(photos) == 10
    assert_parity(hf, photos)


@pytest.mark.parametrize("setting", list(HF_SETTINGS))
def test_parity_on_synthetic_images(setting: str) -> None:
    """Raw PIL images of every mode go to both sides: this covers the RGB conversion (alpha on white) too."""
    family, kwargs = HF_SETTINGS[setting]
    assert_parity(hf_processor(family, **kwargs), synthetic())


def test_decoded_transparency_matches_what_transformers_does_with_the_raw_image() -> None:
    pre = ImagePreprocessor(CLIP)
    hf = hf_processor("CLIP")
    for image, fmt in ((rgba_image(), "PNG"), (palette_image(), "PNG"), (rgba_image(), "WEBP")):
        data = encode(image, fmt, lossless=True) if fmt == "WEBP" else encode(image, fmt)
        raw = Image.open(io.BytesIO(data))
        ours = pre([pre.decode(data)])["pixel_values"]
        np.testing.assert_array_equal(ours, hf([raw], return_tensors="np")["pixel_values"])


# --- preprocessor_config.json ---------------------------------------------------------------------------------------
def test_config_from_the_clip_and_siglip_processors() -> None:
    clip = image_config_from_hf(json.loads(json.dumps(hf_processor("CLIP").to_dict())))  # as read from the file
    assert clip == CLIP
    siglip = image_config_from_hf(hf_processor("Siglip").to_dict())
    assert siglip == ImagePreprocessing(
        resize_mode="exact", size=224, crop_size=None, resample="bicubic", mean=[0.5] * 3, std=[0.5] * 3
    )
    assert siglip.output_size == 224


def test_config_from_a_legacy_clip_feature_extractor() -> None:
    """openai/clip-vit-base-patch32 still ships this 2021 form: ints for sizes, no image_processor_type."""
    legacy = {
        "feature_extractor_type": "CLIPFeatureExtractor",
        "size": 224,
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": CLIP.mean,
        "image_std": CLIP.std,
        "resample": 3,
    }
    assert image_config_from_hf(legacy) == CLIP
    fast = {**legacy, "image_processor_type": "CLIPImageProcessorFast", "do_normalize": False, "do_rescale": False}
    config = image_config_from_hf(fast)
    assert (config.mean, config.std, config.rescale_factor) == ([0.0] * 3, [1.0] * 3, 1.0)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"crop_size": {"height": 224, "width": 256}}, "non-square crop_size"),
        ({"size": {"height": 224, "width": 200}}, "non-square size"),
        ({"size": {"shortest_edge": 224, "longest_edge": 400}}, "size="),
        ({"resample": 1}, "resample=1"),
        ({"do_resize": False}, "do_resize"),
        ({"do_pad": True}, "do_pad"),
        ({"crop_pct": 0.875}, "crop_pct"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_processor_type": "Siglip2ImageProcessor"}, "Siglip2ImageProcessor"),
    ],
)
def test_config_refuses_what_it_cannot_reproduce(change: dict, says: str) -> None:
    base = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}}
    with pytest.raises(ExportError, match=says):
        image_config_from_hf({**base, **change})


# --- decoding ------------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image = ImagePreprocessor(CLIP).decode(encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95))
    assert image.mode == "RGB" and image.size == (20, 40)
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left edge is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "image, fmt",
    [
        (noise(30, 20, "L"), "JPEG"),
        (noise(30, 20, "CMYK"), "JPEG"),
        (noise(30, 20).quantize(8), "PNG"),
        (noise(30, 20, "RGBA"), "PNG"),
        (noise(30, 20, "LA"), "PNG"),
        (noise(30, 20), "WEBP"),
        (noise(30, 20), "BMP"),
        (noise(30, 20), "TIFF"),
        (noise(30, 20).quantize(8), "GIF"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.mode,
)
def test_every_supported_format_and_mode_comes_out_rgb(image: Image.Image, fmt: str) -> None:
    decoded = ImagePreprocessor(CLIP).decode(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (30, 20)


def test_transparency_is_composited_on_white_and_pixels_survive_lossless_formats() -> None:
    pre = ImagePreprocessor(CLIP)
    rgb = noise(16, 12)
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {})):
        np.testing.assert_array_equal(np.asarray(pre.decode(encode(rgb, fmt, **kwargs))), np.asarray(rgb))
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(pre.decode(encode(clear, "PNG"))).min() == 255
    keyed = Image.new("P", (4, 4), 1)
    keyed.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(pre.decode(encode(keyed, "PNG", transparency=1))).min() == 255


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert tuple(np.asarray(ImagePreprocessor(CLIP).decode(data))[4, 4]) == (255, 0, 0)


def test_a_16_bit_png_keeps_its_range() -> None:
    """Pillow's convert("RGB") would clip everything above 255 to white (transformers does that); we scale."""
    deep = Image.fromarray(np.array([[0, 128 * 257, 65535]], dtype=np.uint16))
    decoded = np.asarray(ImagePreprocessor(CLIP).decode(encode(deep, "PNG")))
    assert decoded.shape == (1, 3, 3)
    assert decoded[0, :, 0].tolist() == [0, 128, 255]


def test_paths_and_bytes_give_the_same_image(tmp_path: Path) -> None:
    pre = ImagePreprocessor(CLIP)
    data = encode(noise(33, 21), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = np.asarray(pre.decode(data))
    for source in (path, str(path), bytearray(data)):
        np.testing.assert_array_equal(np.asarray(pre.decode(source)), expected)
    with pytest.raises(InvalidInput, match="no image file"):
        pre.decode(tmp_path / "missing.png")


@pytest.mark.parametrize(
    "data, says",
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
        (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        (encode(noise(30, 20), "PPM"), "not an image"),  # Pillow reads it; uploads are limited to photo formats
        (encode(noise(64, 64), "JPEG", quality=95)[:700], "corrupt or truncated"),
        (encode(noise(64, 64), "PNG")[:-200], "corrupt or truncated"),
        (png_header(64, 64), "corrupt or truncated"),
        (12345, "bytes or a path"),
    ],
    ids=["empty", "text", "random", "ppm", "truncated-jpeg", "truncated-png", "header-only-png", "int"],
)
def test_unusable_input_is_refused_with_invalid_input(data, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        ImagePreprocessor(CLIP).decode(data)


def test_oversized_images_are_refused_from_their_header() -> None:
    """The header-only files cannot be decoded at all, so a pixel-limit message proves nothing was decoded."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InvalidInput, match="over the pixel limit of 64,000,000") as caught:
        ImagePreprocessor(CLIP).decode(png_header(9000, 8000))  # ours: under Pillow's own limit
    assert caught.value.details == {"width": 9000, "height": 8000, "max_pixels": 64_000_000}
    with pytest.raises(InvalidInput, match="pixel limit"):
        ImagePreprocessor(CLIP).decode(png_header(20000, 20000))  # Pillow's DecompressionBombError, translated
    with pytest.raises(InvalidInput, match="pixel limit of 1,000"):
        ImagePreprocessor(CLIP, max_pixels=1000).decode(encode(noise(40, 30), "PNG"))
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # the process-wide setting is left alone


# --- tensors ---------------------------------------------------------------------------------------------------------
def test_pixel_values_shape_and_empty_batch() -> None:
    pre = ImagePreprocessor.from_config(CLIP.model_copy(update={"size": 40, "crop_size": 32}))
    assert pre([noise(50, 70), noise(9, 9, "L")])["pixel_values"].shape == (2, 3, 32, 32)
    assert pre([])["pixel_values"].shape == (0, 3, 32, 32)
    assert pre.resized_size(101, 50) == (80, 40)  # int(40 * 101 / 50) = 80: truncated, not rounded


def test_an_extreme_aspect_ratio_is_refused_before_resizing() -> None:
    """64000x1 is a small image, but scaling its short side to 224 would make it 224 x 14,336,000 pixels."""
    with pytest.raises(InvalidInput, match="resized image too large"):
        ImagePreprocessor(CLIP)([Image.new("RGB", (64000, 1))])


def test_decode_cost_comes_from_the_header_and_refuses_what_decode_would() -> None:
    """The cost of decoding, read from the header: per mode as Pillow stores it, plus a row pointer per row; what
    resizing would make of a 1 x 64,000,000 picture is refused from a header-only file, so before any pixel."""
    pre = ImagePreprocessor(CLIP)
    with pytest.raises(InvalidInput, match="resized image too large"):
        pre.decode_cost(png_header(1, 64_000_000))
    with pytest.raises(InvalidInput, match="resized image too large"):
        pre.decode(png_header(1, 64_000_000))  # from the header too, not after decoding 1.7 GB
    with pytest.raises(InvalidInput, match="over the pixel limit of 64,000,000"):
        pre.decode_cost(png_header(9000, 8000))
    for data, says in ((b"", "empty"), (b"hello, this is text", "not an image")):
        with pytest.raises(InvalidInput, match=says):
            pre.decode_cost(data)
    px = 8000 * 8000
    bilevel = pre.decode_cost(encode(Image.new("1", (8000, 8000)), "PNG"))  # 8 KB of file
    assert 6 * px <= bilevel.peak < 7 * px  # the file's image and its oriented copy (1 byte a pixel), then RGB (4)
    assert 4 * px <= bilevel.kept < 5 * px  # the RGB image while it waits for the encoder
    rgba = pre.decode_cost(encode(noise(400, 300, "RGBA"), "PNG"))
    rgb = pre.decode_cost(encode(noise(400, 300), "PNG"))
    assert rgba.peak > 2 * rgb.peak and rgba.kept == rgb.kept  # compositing onto white costs; the result is RGB
