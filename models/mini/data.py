"""Generated training and demo data for xmodal-mini: pictures of coloured shapes and short synthetic sounds, each
with captions from templates. Deterministic from a seed; numpy and Pillow only (no torch), so the demo can use it.

A sample's ``key`` names what it shows or sounds like, canonically ("a red circle above a blue square" and "a blue
square below a red circle" share one key): samples with the same key are positives for one another in training
and count as correct answers in evaluation. Some compositions are held out of the train split and make up the
``heldout`` split alone, so evaluation measures generalisation to unseen combinations, not memory:

- images: four colour-shape pairs (``HELDOUT_PAIRS``) never appear in training, though each colour and each shape
  does, with others;
- sounds: three orders of event kinds (``HELDOUT_ORDERS``: a chirp then noise, ...) never appear in training,
  though the reverse orders do, and high buzzy beeps never do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Split = str  # "train" | "heldout" | "all"
SPLITS = ("train", "heldout", "all")

# --- images -------------------------------------------------------------------------------------------------------
IMAGE_SIZE = 64
_SUPER = 4  # drawn at 4x and downsampled: anti-aliased edges, as a camera would see them
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square")})
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZES = {"small": (5.0, 6.5), "": (7.0, 9.5), "large": (11.0, 13.5)}  # radius in pixels at 64x64
RELATIONS = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}


@dataclass(frozen=True)
class Scene:
    """One picture: what is in it (``key``), captions for it, and everything ``render`` needs."""

    id: str
    key: str
    captions: tuple[str, ...]
    objects: tuple[tuple[str, str, float, float, float], ...]  # (colour, shape, cx, cy, radius)
    background: tuple[int, int, int]
    noise_seed: int

    def render(self) -> Image.Image:
        s = IMAGE_SIZE * _SUPER
        im = Image.new("RGB", (s, s), self.background)
        draw = ImageDraw.Draw(im)
        for colour, shape, cx, cy, r in self.objects:
            _draw_shape(draw, shape, cx * _SUPER, cy * _SUPER, r * _SUPER, COLOURS[colour])
        small = np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS), dtype=np.float32)
        noise = np.random.default_rng(self.noise_seed).normal(0.0, 4.0, small.shape)
        return Image.fromarray(np.clip(np.rint(small + noise), 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.88
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _pair_allowed(colour: str, shape: str, split: Split) -> bool:
    return True if split == "all" else (((colour, shape) in HELDOUT_PAIRS) == (split == "heldout"))


def _place(rng: np.random.Generator, radii: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Non-overlapping centres inside the frame."""
    out: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r + 1, IMAGE_SIZE - r - 1, 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (r + rb + 2) ** 2 for (a, b), rb in zip(out, radii, strict=False)):
                out.append((float(x), float(y)))
                break
        else:
            return None
    return out


def _count_scene(rng: np.random.Generator, split: Split) -> tuple[str, list[str], list] | None:
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    if not _pair_allowed(colour, shape, split):
        return None
    n = int(rng.integers(1, 4))
    size = str(rng.choice(["small", "", "large"] if n == 1 else ["small", ""]))
    lo, hi = SIZES[size]
    radii = [float(rng.uniform(lo, hi)) for _ in range(n)]
    centres = _place(rng, radii)
    if centres is None:
        return None
    adj = f"{size} {colour}" if size else colour
    noun = shape if n == 1 else PLURAL[shape]
    num = NUMBERS[n]
    art = "a" if n == 1 else num
    captions = [
        f"{art} {adj} {noun}",
        f"a picture of {num} {adj} {noun}",
        f"{num} {adj} {noun} on a dark background",
        f"there {'is' if n == 1 else 'are'} {num} {adj} {noun}",
    ]
    objects = [(colour, shape, x, y, r) for (x, y), r in zip(centres, radii, strict=True)]
    return f"count:{n}:{size or 'medium'}:{colour}:{shape}", captions, objects


def _relation_scene(rng: np.random.Generator, split: Split) -> tuple[str, list[str], list] | None:
    (ca, sa), (cb, sb) = ((str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) for _ in range(2))
    if (ca, sa) == (cb, sb):
        return None
    pairs = {(ca, sa), (cb, sb)}
    if split == "train" and pairs & HELDOUT_PAIRS:
        return None
    if split == "heldout" and not pairs & HELDOUT_PAIRS:
        return None
    rel = str(rng.choice(list(RELATIONS)))
    ra, rb = (float(rng.uniform(7.0, 11.0)) for _ in range(2))
    # A's centre: away from B along the relation's axis, jittered across it.
    along_a = float(rng.uniform(ra + 1, IMAGE_SIZE / 2 - 2))
    lo_b, hi_b = max(along_a + ra + rb + 4, IMAGE_SIZE / 2 + 2), IMAGE_SIZE - rb - 1
    if lo_b >= hi_b:
        return None
    along_b = float(rng.uniform(lo_b, hi_b))
    across_a, across_b = (float(rng.uniform(max(ra, rb) + 1, IMAGE_SIZE - max(ra, rb) - 1)) for _ in range(2))
    if abs(across_a - across_b) > 0.7 * abs(along_b - along_a):  # keep the relation unambiguous
        across_b = across_a + float(rng.uniform(-0.3, 0.3)) * abs(along_b - along_a)
        across_b = float(np.clip(across_b, rb + 1, IMAGE_SIZE - rb - 1))
    first_is_a = rel in ("above", "to the left of")  # A comes first along the axis (top or left)
    pa, pb = (along_a, along_b) if first_is_a else (along_b, along_a)
    vertical = rel in ("above", "below")
    xa, ya = (across_a, pa) if vertical else (pa, across_a)
    xb, yb = (across_b, pb) if vertical else (pb, across_b)
    inv = RELATIONS[rel]
    a, b = f"{ca} {sa}", f"{cb} {sb}"
    captions = [f"a {a} {rel} a {b}", f"a {b} {inv} a {a}", f"the {a} is {rel} the {b}", f"a {a} sitting {rel} a {b}"]
    # Canonical key: top thing "above" bottom thing, left thing "left of" right thing.
    if rel in ("above", "to the left of"):
        key = f"rel:{a}:{'above' if vertical else 'left'}:{b}"
    else:
        key = f"rel:{b}:{'above' if vertical else 'left'}:{a}"
    return key, captions, [(ca, sa, xa, ya, ra), (cb, sb, xb, yb, rb)]


def make_scenes(n: int, seed: int, split: Split = "train", id_prefix: str = "img") -> list[Scene]:
    """``n`` scenes of ``split`` (train: no held-out pair; heldout: each has one; all: anything), half counts and
    half spatial relations, deterministic from ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    out: list[Scene] = []
    while len(out) < n:
        made = (_count_scene if len(out) % 2 == 0 else _relation_scene)(rng, split)
        if made is None:
            continue
        key, captions, objects = made
        background = tuple(int(v) for v in rng.integers(15, 75, 3))
        out.append(
            Scene(
                id=f"{id_prefix}-{len(out):05d}",
                key=key,
                captions=tuple(captions),
                objects=tuple(objects),
                background=background,  # type: ignore[arg-type]
                noise_seed=int(rng.integers(2**31)),
            )
        )
    return out


# --- sounds -------------------------------------------------------------------------------------------------------
SAMPLE_RATE = 16_000
CLIP_SECONDS = 2.0
PITCH_HZ = {"high": (1400.0, 1800.0), "low": (300.0, 420.0)}
TIMBRE_WORDS = {"pure": ("pure", "clean"), "buzzy": ("buzzy", "harsh")}
HELDOUT_ORDERS = frozenset({("chirp", "noise"), ("noise", "tone"), ("tone", "beeps")})
HELDOUT_BEEPS = frozenset({("high", "buzzy")})


@dataclass(frozen=True)
class Event:
    kind: str  # beeps | tone | chirp | noise
    count: int = 1
    pitch: str = ""  # high | low (beeps, tone)
    timbre: str = "pure"  # pure | buzzy (beeps, tone)
    direction: str = ""  # rising | falling (chirp)

    @property
    def key(self) -> str:
        return f"{self.kind}{self.count if self.kind == 'beeps' else ''}:{self.pitch}{self.direction}:{self.timbre}"

    def phrase(self, rng: np.random.Generator) -> str:
        if self.kind == "beeps":
            t = str(rng.choice(TIMBRE_WORDS[self.timbre]))
            noun = "beep" if self.count == 1 else "beeps"
            num = "a" if self.count == 1 else NUMBERS[self.count]
            return str(rng.choice([f"{num} short {self.pitch} {t} {noun}", f"{num} {t} {self.pitch} {noun}"]))
        if self.kind == "tone":
            t = str(rng.choice(TIMBRE_WORDS[self.timbre]))
            return str(rng.choice([f"a long {self.pitch} {t} tone", f"a {t} {self.pitch} tone"]))
        if self.kind == "chirp":
            up = self.direction == "rising"
            return str(rng.choice([f"a {self.direction} chirp", f"{'an upward' if up else 'a downward'} sweep"]))
        return str(rng.choice(["a burst of noise", "a noise burst", "a hiss of noise"]))


@dataclass(frozen=True)
class Sound:
    """One clip: what it sounds like (``key``), captions for it, and everything ``render`` needs."""

    id: str
    key: str
    captions: tuple[str, ...]
    events: tuple[Event, ...]
    seed: int

    def render(self) -> np.ndarray:
        """Mono float32 in [-1, 1] at ``SAMPLE_RATE``, ``CLIP_SECONDS`` long."""
        rng = np.random.default_rng(self.seed)
        out = np.zeros(round(SAMPLE_RATE * CLIP_SECONDS), dtype=np.float64)
        t = float(rng.uniform(0.02, 0.15))
        for event in self.events:
            t = _add_event(out, event, t, rng) + float(rng.uniform(0.12, 0.22))
        out += rng.normal(0.0, float(rng.uniform(0.002, 0.01)), out.shape)  # a little room noise
        return np.clip(out, -1.0, 1.0).astype(np.float32)


def _envelope(n: int, fade: int) -> np.ndarray:
    env = np.ones(n)
    fade = min(fade, n // 2)
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
    env[:fade], env[n - fade :] = ramp, ramp[::-1]
    return env


def _oscillator(phase: np.ndarray, timbre: str, f0: float) -> np.ndarray:
    if timbre == "pure":
        return np.sin(phase)
    # Odd harmonics up to 7.5 kHz: a band-limited square wave (buzzy), normalised to the sine's loudness.
    wave = sum(np.sin(k * phase) / k for k in range(1, 40, 2) if k * f0 < 7500)
    return wave / 1.1


def _add_event(out: np.ndarray, e: Event, t: float, rng: np.random.Generator) -> float:
    """Mix event ``e`` into ``out`` from ``t`` seconds; returns where it ends."""
    amp = float(rng.uniform(0.25, 0.6))
    fade = int(0.005 * SAMPLE_RATE)
    if e.kind == "beeps":
        f0 = float(rng.uniform(*PITCH_HZ[e.pitch]))
        dur, gap = float(rng.uniform(0.08, 0.12)), float(rng.uniform(0.07, 0.11))
        for i in range(e.count):
            t = _write(out, t, amp * _envelope(n := int(dur * SAMPLE_RATE), fade) * _tone(n, f0, e.timbre))
            if i < e.count - 1:
                t += gap
        return t
    if e.kind == "tone":
        f0 = float(rng.uniform(*PITCH_HZ[e.pitch]))
        n = int(float(rng.uniform(0.45, 0.6)) * SAMPLE_RATE)
        return _write(out, t, amp * _envelope(n, 4 * fade) * _tone(n, f0, e.timbre))
    if e.kind == "chirp":
        n = int(float(rng.uniform(0.35, 0.45)) * SAMPLE_RATE)
        lo, hi = float(rng.uniform(300, 500)), float(rng.uniform(2200, 3000))
        f = np.geomspace(lo, hi, n) if e.direction == "rising" else np.geomspace(hi, lo, n)
        phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
        return _write(out, t, amp * _envelope(n, fade) * np.sin(phase))
    n = int(float(rng.uniform(0.25, 0.35)) * SAMPLE_RATE)
    return _write(out, t, 0.7 * amp * _envelope(n, 2 * fade) * rng.uniform(-1.0, 1.0, n))


def _tone(n: int, f0: float, timbre: str) -> np.ndarray:
    phase = 2 * np.pi * f0 * np.arange(n) / SAMPLE_RATE
    return _oscillator(phase, timbre, f0)


def _write(out: np.ndarray, t: float, signal: np.ndarray) -> float:
    start = int(t * SAMPLE_RATE)
    end = min(len(out), start + len(signal))
    if end > start:
        out[start:end] += signal[: end - start]
    return t + len(signal) / SAMPLE_RATE


def _random_event(rng: np.random.Generator, max_beeps: int) -> Event:
    kind = str(rng.choice(["beeps", "tone", "chirp", "noise"]))
    if kind == "beeps":
        return Event("beeps", count=int(rng.integers(1, max_beeps + 1)), pitch=str(rng.choice(["high", "low"])))
    if kind == "tone":
        return Event("tone", pitch=str(rng.choice(["high", "low"])), timbre=str(rng.choice(["pure", "buzzy"])))
    if kind == "chirp":
        return Event("chirp", direction=str(rng.choice(["rising", "falling"])), timbre="")
    return Event("noise", timbre="")


def _sound_heldout(events: tuple[Event, ...]) -> bool:
    if len(events) == 2:
        return (events[0].kind, events[1].kind) in HELDOUT_ORDERS
    e = events[0]
    return (e.pitch, e.timbre) in HELDOUT_BEEPS


def make_sounds(n: int, seed: int, split: Split = "train", id_prefix: str = "snd") -> list[Sound]:
    """``n`` sounds of ``split``: half repeated beeps (one to four, high or low, pure or buzzy), half two events in
    order ("two high beeps then a falling chirp"), deterministic from ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 2])
    out: list[Sound] = []
    while len(out) < n:
        if len(out) % 2 == 0:
            beeps = Event(
                "beeps",
                count=int(rng.integers(1, 5)),
                pitch=str(rng.choice(["high", "low"])),
                timbre=str(rng.choice(["pure", "buzzy"])),
            )
            events: tuple[Event, ...] = (beeps,)
        else:
            events = (_random_event(rng, 3), _random_event(rng, 3))
            if events[0].kind == events[1].kind:
                continue
        if split != "all" and _sound_heldout(events) != (split == "heldout"):
            continue
        if len(events) == 1:
            captions = [events[0].phrase(rng) for _ in range(2)] + [f"the sound of {events[0].phrase(rng)}"]
        else:
            a, b = events
            captions = [
                f"{a.phrase(rng)} then {b.phrase(rng)}",
                f"{a.phrase(rng)} followed by {b.phrase(rng)}",
                f"first {a.phrase(rng)}, then {b.phrase(rng)}",
            ]
        key = "seq:" + ">".join(e.key for e in events)
        out.append(Sound(f"{id_prefix}-{len(out):05d}", key, tuple(captions), events, int(rng.integers(2**31))))
    return out
