"""Image preprocessing without torch: decode untrusted bytes safely, then reproduce the checkpoint's Hugging Face
image processor (the PIL backend of ``CLIPImageProcessor`` / ``SiglipImageProcessor``) with Pillow and numpy.

Parity matters more than elegance here: the ONNX image tower only gives the checkpoint's embeddings if its input is
the same tensor the processor made at training and export time. So every step copies what transformers does,
including its integer truncation of resized sizes, its centre-crop offsets and zero padding, and its float64 rescale
followed by a float32 normalisation (``tests/models/test_image.py`` checks this against the real processors).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from models.bundle import ImagePreprocessing
from models.cost import DecodeCost
from models.errors import ExportError, InvalidInput

# Formats we decode. Pillow recognises dozens (EPS even shells out to Ghostscript); untrusted uploads only get the
# common photo formats. MPO (multi-picture JPEGs from phones) opens through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ONE_BYTE = {"1", "L", "P"}  # Pillow stores these modes in one byte a pixel, 16-bit grey in two, the others in four
ROW_BYTES = 8  # Pillow keeps a pointer per row: a 1 x 64,000,000 image costs 512 MB of pointers alone


@functools.cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; Image.open raises KeyError on a format name Pillow does not know
    return tuple(f for f in FORMATS if f in Image.OPEN)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' ``convert_to_rgb`` does it: transparency is composited onto white, everything else
    goes through ``Image.convert("RGB")`` (grey is replicated, palettes looked up, CMYK converted)."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert() clips 16-bit grey at 255, which turns a 16-bit PNG nearly white; keep its range instead.
        # (transformers would clip: the one place we deliberately differ.)
        grey = np.asarray(image).astype(np.float64) * (255 / 65535)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Whatever Pillow raises on untrusted bytes, as InvalidInput saying why."""
    try:
        yield
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside Image.open (the warning only where warnings are made errors).
        raise InvalidInput(f"image too large: over the pixel limit ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidInput(f"not an image in a supported format ({', '.join(FORMATS)})") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise InvalidInput(f"corrupt or truncated image: {exc}") from exc


class ImagePreprocessor:
    """``decode`` turns bytes or a file into an RGB image (or refuses with InvalidInput); calling the preprocessor on
    a list of images gives the tower's ``pixel_values``, float32 [B, 3, S, S]."""

    def __init__(self, config: ImagePreprocessing, max_pixels: int = 64_000_000) -> None:
        self.config = config
        self.max_pixels = max_pixels
        self.output_size = config.output_size
        self.resample = RESAMPLE[config.resample]
        # Inputs are uint8, so rescale + normalise is a 256-entry table per channel, computed exactly as
        # transformers does it: uint8 -> float64 times rescale_factor -> float32, then (x - mean) / std in float32.
        levels = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
        mean = np.asarray(config.mean, dtype=np.float32)[:, None]
        std = np.asarray(config.std, dtype=np.float32)[:, None]
        self._table = (levels[None, :] - mean) / std  # [3, 256] float32

    @classmethod
    def from_config(cls, config: ImagePreprocessing, max_pixels: int = 64_000_000) -> ImagePreprocessor:
        return cls(config, max_pixels=max_pixels)

    # --- decoding -------------------------------------------------------------------------------------------------
    def decode_cost(self, data: bytes) -> DecodeCost:
        """The memory ``decode`` and the tensor step will take for these bytes, read from the header only (Pillow's
        lazy open decodes no pixel). Refuses what ``decode`` would refuse for its size, before any pixel is decoded.
        An upper bound measured on PNGs: decoding keeps the file's own image, an oriented copy, and the RGB conversion
        (through RGBA for transparency, through float64 for 16-bit grey) alive at once."""
        if not data:
            raise InvalidInput("empty image: no bytes")
        with _refusals(), Image.open(io.BytesIO(data), formats=_open_formats()) as im:
            (width, height), mode, transparent = im.size, im.mode, im.info.get("transparency") is not None
        self._check_size(width, height)
        pixels = width * height
        own = (1 if mode in _ONE_BYTE else 2 if mode in _SIXTEEN_BIT else 4) * pixels + ROW_BYTES * height
        rgb = 4 * pixels + ROW_BYTES * height
        if mode in _SIXTEEN_BIT:
            convert = 26 * pixels + rgb  # float64 scaling temporaries, then L, then RGB
        elif "A" in mode or transparent:
            convert = 3 * rgb  # RGBA, a white RGBA, their composite, then RGB
        else:
            convert = 0 if mode == "RGB" else rgb
        rw, rh = self.resized_size(width, height)
        resized = 7 * rw * rh + ROW_BYTES * rh  # the resized RGB image and its array
        return DecodeCost(peak=2 * own + convert, kept=rgb + resized)

    def _check_size(self, width: int, height: int) -> None:
        """The pixel limit, on the image and on what resizing would make of it (64000x1 becomes billions)."""
        self._check_pixels(width, height, what="image")
        self._check_pixels(*self.resized_size(width, height), what="resized image")

    def decode(self, data: bytes | str | os.PathLike[str]) -> Image.Image:
        """The bytes of an image file, or its path → an RGB image, EXIF orientation applied (as phones expect)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if not data:
                raise InvalidInput("empty image: no bytes")
            source: Any = io.BytesIO(data)
        elif isinstance(data, (str, os.PathLike)):
            source = Path(data)
            if not source.is_file():
                raise InvalidInput(f"no image file at {source}")
        else:
            raise InvalidInput(f"an image is given as bytes or a path, not {type(data).__name__}")
        with _refusals(), Image.open(source, formats=_open_formats()) as im:
            # Only the header has been read so far: refuse decompression bombs before any pixel is decoded.
            # Our own limit, not Pillow's process-wide MAX_IMAGE_PIXELS, which other code may change.
            self._check_size(*im.size)
            im.load()
            image = self._orient(im)
            return to_rgb(image)

    @staticmethod
    def _orient(im: Image.Image) -> Image.Image:
        try:
            return ImageOps.exif_transpose(im)
        except Exception:  # a malformed EXIF block should not cost the picture, only its rotation
            return im.copy()

    def _check_pixels(self, width: int, height: int, what: str) -> None:
        if width < 1 or height < 1:
            raise InvalidInput(f"{what} has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise InvalidInput(
                f"{what} too large: {width}x{height} is {width * height:,} pixels, over the pixel limit of "
                f"{self.max_pixels:,}",
                width=width,
                height=height,
                max_pixels=self.max_pixels,
            )

    # --- tensors --------------------------------------------------------------------------------------------------
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, as transformers computes it."""
        size = self.config.size
        if self.config.resize_mode == "exact":
            return size, size
        # get_resize_output_image_size(default_to_square=False): the short side becomes `size`, the long side is
        # truncated (int(), not round()), with this exact float expression.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        return (size, new_long) if width <= height else (new_long, size)

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width`` x ``height`` image the model sees, in its pixels (left, top, right, bottom):
        the centre crop mapped back through the resize. It may reach past the image where the crop zero-pads."""
        crop = self.config.crop_size
        if crop is None:
            return 0.0, 0.0, float(width), float(height)
        rw, rh = self.resized_size(width, height)
        left, top = (rw - crop) // 2, (rh - crop) // 2
        sx, sy = width / rw, height / rh
        return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """One image → uint8 [S, S, 3], resized and centre-cropped."""
        image = to_rgb(image)
        self._check_pixels(*image.size, what="image")
        width, height = self.resized_size(*image.size)
        # An extreme aspect ratio (say 64000x1) would blow up to billions of pixels before the crop.
        self._check_pixels(width, height, what="resized image")
        pixels = np.asarray(image.resize((width, height), resample=self.resample))
        crop = self.config.crop_size
        return pixels if crop is None else center_crop(pixels, crop)

    def __call__(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        s = self.output_size
        out = np.empty((len(images), 3, s, s), dtype=np.float32)
        channel = np.arange(3)[:, None, None]
        for i, image in enumerate(images):
            out[i] = self._table[channel, self._pixels(image).transpose(2, 0, 1)]
        return {"pixel_values": out}


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """transformers' ``center_crop`` on an [H, W, C] array: floor offsets; an image smaller than the crop is first
    zero-padded, the extra pixel of an odd padding going after the image (ceil before)."""
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + size, left : left + size]
    new_h, new_w = max(size, height), max(size, width)
    pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : top + size, max(0, left) : left + size]


# --- Hugging Face processor configs ----------------------------------------------------------------------------------
_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
_CLIP = {
    "default_to_square": False,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": _OPENAI_MEAN,
    "image_std": _OPENAI_STD,
}
# The class defaults a preprocessor_config.json may leave out, for the processors whose pipeline we reproduce.
# Others (Siglip2's patches, ConvNext's crop_pct, ...) resize differently and are refused rather than approximated.
HF_PROCESSORS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP,
    "CLIPFeatureExtractor": _CLIP,  # the pre-2023 name of the same processor
    "SiglipImageProcessor": {
        "default_to_square": False,
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "crop_size": None,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
}
_PIL_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values, as configs store them


def image_config_from_hf(processor_config: dict[str, Any]) -> ImagePreprocessing:
    """A checkpoint's ``preprocessor_config.json`` (or ``processor.to_dict()``) → ImagePreprocessing, or ExportError
    naming the setting we cannot reproduce exactly."""
    kind = processor_config.get("image_processor_type") or processor_config.get("feature_extractor_type") or ""
    base = kind.removesuffix("Fast").removesuffix("Pil")
    if base not in HF_PROCESSORS:
        raise ExportError(
            f"image processor {kind or '(unnamed)'!r} is not supported; supported: {', '.join(sorted(HF_PROCESSORS))}"
        )
    cfg = {**HF_PROCESSORS[base], **{k: v for k, v in processor_config.items() if v is not None}}

    for flag in ("do_pad", "do_reduce_labels"):
        if cfg.get(flag):
            raise ExportError(f"image processor setting {flag}=true is not supported")
    if cfg.get("crop_pct") is not None:
        raise ExportError("image processor setting crop_pct is not supported")
    if not cfg["do_resize"]:
        raise ExportError("image processors without resizing (do_resize=false) are not supported")

    resize_mode, size = _hf_size(cfg["size"], square=cfg["default_to_square"], what="size")
    crop_size = None
    if cfg["do_center_crop"]:
        if cfg.get("crop_size") is None:
            raise ExportError("do_center_crop is set but crop_size is missing")
        crop_mode, crop_size = _hf_size(cfg["crop_size"], square=True, what="crop_size")
        if crop_mode != "exact":
            raise ExportError(f"crop_size={cfg['crop_size']!r} is not supported (height and width)")
    resample = _PIL_CODES.get(int(cfg["resample"]))
    if resample is None:
        raise ExportError(f"resample={cfg['resample']!r} is not supported (0 nearest, 2 bilinear, 3 bicubic)")
    if cfg["do_normalize"]:
        mean, std = _three(cfg["image_mean"], "image_mean"), _three(cfg["image_std"], "image_std")
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # (x - 0) / 1 is exact in float32: same as not normalising
    return ImagePreprocessing(
        resize_mode=resize_mode,
        size=size,
        crop_size=crop_size,
        resample=resample,
        rescale_factor=float(cfg["rescale_factor"]) if cfg["do_rescale"] else 1.0,
        mean=mean,
        std=std,
    )


def _hf_size(value: Any, square: bool, what: str) -> tuple[str, int]:
    """HF size settings: {"shortest_edge": n}, {"height": n, "width": n}, or a legacy int (a square where the
    processor defaults to squares, else the shortest edge)."""
    if isinstance(value, int):
        return ("exact" if square else "shortest_edge"), value
    if isinstance(value, dict):
        keys = {k for k, v in value.items() if v is not None}
        if keys == {"shortest_edge"}:
            return "shortest_edge", int(value["shortest_edge"])
        if keys == {"height", "width"}:
            if value["height"] != value["width"]:
                raise ExportError(f"non-square {what} {value['height']}x{value['width']} is not supported")
            return "exact", int(value["height"])
    raise ExportError(f"{what}={value!r} is not supported (shortest_edge, or equal height and width)")


def _three(value: Any, what: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ExportError(f"{what} must have 3 values (RGB), got {len(values)}")
    return values
