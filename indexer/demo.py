"""The demo corpus: a few thousand short documents generated from templates, deterministically.

Each document belongs to a topic (kept in its metadata), so a search for "a rocket leaving the launch
pad" should return space documents: a real, checkable retrieval task with no third-party text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from indexer.encode import MEDIA_SOURCES
from indexer.layout import IndexDir, VersionManifest
from models.errors import XmodalError
from models.files import atomic_write_bytes, sha256_file

TOPICS: dict[str, dict[str, list[str]]] = {
    "space": {
        "subject": [
            "the rocket",
            "an astronaut",
            "the space probe",
            "the telescope",
            "a satellite",
            "the lunar lander",
        ],
        "verb": ["orbits", "photographs", "launches towards", "drifts past", "signals from", "lands near"],
        "object": [
            "a distant galaxy",
            "the red planet",
            "the rings of Saturn",
            "a comet",
            "the far side of the moon",
            "a nebula",
        ],
    },
    "cooking": {
        "subject": ["the chef", "my grandmother", "a baker", "the cook", "the pastry team", "a home cook"],
        "verb": ["slowly simmers", "bakes", "seasons", "grills", "kneads", "whisks"],
        "object": [
            "a tomato sauce",
            "sourdough bread",
            "fresh pasta",
            "a lemon tart",
            "the vegetable soup",
            "a chocolate cake",
        ],
    },
    "football": {
        "subject": ["the striker", "the goalkeeper", "the home team", "a young midfielder", "the referee", "the coach"],
        "verb": [
            "scores against",
            "saves a penalty from",
            "celebrates beating",
            "argues with",
            "trains with",
            "defends against",
        ],
        "object": [
            "the league champions",
            "the visiting side",
            "a rival club",
            "the national team",
            "the defenders",
            "the crowd",
        ],
    },
    "music": {
        "subject": ["the violinist", "a jazz pianist", "the choir", "the drummer", "an orchestra", "the guitarist"],
        "verb": ["performs", "improvises", "rehearses", "records", "composes", "tunes up for"],
        "object": [
            "a symphony",
            "a slow ballad",
            "the concert",
            "an album of songs",
            "a string quartet",
            "the opening melody",
        ],
    },
    "weather": {
        "subject": [
            "a thunderstorm",
            "the heavy rain",
            "a cold front",
            "the morning fog",
            "strong winds",
            "the heatwave",
        ],
        "verb": ["sweeps across", "floods", "settles over", "batters", "lingers above", "moves towards"],
        "object": [
            "the coastal towns",
            "the valley",
            "the city streets",
            "the northern hills",
            "the harbour",
            "the farmland",
        ],
    },
    "medicine": {
        "subject": ["the surgeon", "a nurse", "the doctor", "the hospital", "a pharmacist", "the researchers"],
        "verb": ["treats", "examines", "vaccinates", "operates on", "prescribes medicine for", "monitors"],
        "object": [
            "the patient",
            "a child with a fever",
            "the injured runner",
            "elderly patients",
            "a broken leg",
            "the infection",
        ],
    },
    "gardening": {
        "subject": ["the gardener", "my neighbour", "a volunteer", "the farmer", "the children", "a botanist"],
        "verb": ["plants", "waters", "prunes", "harvests", "grows", "weeds around"],
        "object": [
            "the rose bushes",
            "tomatoes in the greenhouse",
            "an apple tree",
            "the herb garden",
            "tulip bulbs",
            "the vegetable patch",
        ],
    },
    "computing": {
        "subject": [
            "the programmer",
            "a database",
            "the compiler",
            "the server",
            "an engineer",
            "the operating system",
        ],
        "verb": ["optimises", "crashes while running", "debugs", "compiles", "caches", "deploys"],
        "object": [
            "the source code",
            "a slow query",
            "the web application",
            "a memory leak",
            "the network service",
            "a software update",
        ],
    },
}
TAILS = ["", " today", " again", " this morning", " late at night", " for the first time", " once more", " at last"]
TEMPLATES = ["{s} {v} {o}{t}.", "Today {s} {v} {o}.", "News: {s} {v} {o}{t}.", "{S} {v} {o}, everyone says{t}."]


def demo_items(n: int = 3200, seed: int = 7) -> list[dict]:
    # Each (subject, verb, object, template) gives at least one distinct text: a safe bound for the loop.
    capacity = len(TEMPLATES) * sum(len(w["subject"]) * len(w["verb"]) * len(w["object"]) for w in TOPICS.values())
    if n > capacity:
        raise ValueError(f"the demo templates make at most {capacity} distinct documents, not {n}")
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        topic = topics[len(out) % len(topics)]
        words = TOPICS[topic]
        s, v, o = rng.choice(words["subject"]), rng.choice(words["verb"]), rng.choice(words["object"])
        text = rng.choice(TEMPLATES).format(s=s, S=s.capitalize(), v=v, o=o, t=rng.choice(TAILS))
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": f"doc-{len(out):05d}", "text": text, "metadata": {"topic": topic}})
    return out


def write_demo_corpus(path: Path, n: int = 3200, seed: int = 7) -> Path:
    lines = "".join(json.dumps(item, sort_keys=True) + "\n" for item in demo_items(n, seed))
    atomic_write_bytes(path, lines.encode())
    return path


# --- the cross-modal demo: generated pictures and sounds with captions (what xmodal-mini was trained on) -------------
MEDIA_DEMO_SCENES = 1500
MEDIA_DEMO_SOUNDS = 1500
MEDIA_DEMO_SEED = 11  # not the recipe's training seed: the demo shows pictures and sounds the model never saw


def media_demo_items(n_scenes: int = MEDIA_DEMO_SCENES, n_sounds: int = MEDIA_DEMO_SOUNDS, seed: int = MEDIA_DEMO_SEED):
    """(corpus rows, scenes, sounds): one row per picture or sound, with one of its captions as its text and its
    composition in the metadata. Every composition may appear, the ones held out of training too."""
    from models.mini.data import make_scenes, make_sounds

    scenes = make_scenes(n_scenes, seed, "all", id_prefix="img")
    sounds = make_sounds(n_sounds, seed, "all", id_prefix="snd")
    rows = [
        {
            "id": s.id,
            "text": s.captions[i % len(s.captions)],
            "image": f"images/{s.id}.png",
            "metadata": {"kind": "picture", "shows": s.key},
        }
        for i, s in enumerate(scenes)
    ]
    rows += [
        {
            "id": s.id,
            "text": s.captions[i % len(s.captions)],
            "audio": f"sounds/{s.id}.flac",
            "metadata": {"kind": "sound", "sounds": s.key},
        }
        for i, s in enumerate(sounds)
    ]
    return rows, scenes, sounds


def write_media_demo(folder: Path, n_scenes: int = MEDIA_DEMO_SCENES, n_sounds: int = MEDIA_DEMO_SOUNDS) -> Path:
    """Write the pictures (PNG), sounds (FLAC) and ``corpus.jsonl`` under ``folder``; returns the corpus path.
    Deterministic and idempotent: files already there are kept, missing ones are made, the corpus is written last."""
    import io

    import soundfile as sf

    from models.mini.data import SAMPLE_RATE

    rows, scenes, sounds = media_demo_items(n_scenes, n_sounds)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "sounds").mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        path = folder / "images" / f"{scene.id}.png"
        if not path.is_file():
            buf = io.BytesIO()
            scene.render().save(buf, format="PNG", optimize=False)
            atomic_write_bytes(path, buf.getvalue())
    for sound in sounds:
        path = folder / "sounds" / f"{sound.id}.flac"
        if not path.is_file():
            buf = io.BytesIO()
            sf.write(buf, sound.render(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            atomic_write_bytes(path, buf.getvalue())
    corpus = folder / "corpus.jsonl"
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
    if not corpus.is_file() or corpus.read_bytes() != lines:
        atomic_write_bytes(corpus, lines)
    return corpus


def current_demo(index: IndexDir, corpus: Path, fingerprint: str) -> VersionManifest | None:
    """The demo index's published version if it is up to date, else None (build it again): it must hold this
    corpus (by sha256), this model's vectors (a re-exported model gets a new fingerprint), and the token store,
    media paths and score calibration the search page uses, in today's layout."""
    try:
        current = index.manifest() if index.exists() else None
    except XmodalError:  # an older layout, or damaged: build it again
        return None
    if (
        current is not None
        and current.operation == "build"
        and current.build.get("corpus_sha256") == sha256_file(corpus)
        and current.model.fingerprint == fingerprint
        and current.tokens is not None
        and current.build.get("media_sources") == MEDIA_SOURCES
        and current.score_calibration
    ):
        return current
    return None
