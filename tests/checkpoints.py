"""Tiny random-initialised checkpoints laid out exactly like downloaded ones, for export and end-to-end tests.

Tokenizers: CLIP gets a real ``CLIPTokenizer`` written from OpenAI's BPE merges (``../shared/data/clip-bpe``,
49,408 tokens); where that folder is absent, the same tokenizer with no merges (byte-level characters only,
514 tokens). SigLIP's own tokenizer needs sentencepiece, which the export extra does not install, so it gets a
tiny WordPiece tokenizer from the ``tokenizers`` library with SigLIP's special-token layout: ``</s>`` is both
EOS (appended to every text) and the pad token.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CLIP_BPE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(TOWER, image_size=32, patch_size=8)
PATCHES = (32 // 8) ** 2
TOKENIZER_TEXTS = [
    "a dog playing in the snow",
    "cat",
    "two red bicycles against a brick wall next to a small cafe in the morning light",
    "the wing",
    "a photograph of a red bicycle",
    "jet engines and wind tunnels",
    "lift over a thin aerofoil",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(folder: Path) -> object:
    """vocab.json + merges.txt as in openai/clip-vit-*: bytes, bytes + '</w>', one token per merge, then the two
    specials; with the real merges that is 49,408 tokens."""
    import transformers

    merges: list[str] = []
    if CLIP_BPE.is_file():
        with gzip.open(CLIP_BPE, "rt", encoding="utf-8") as fh:
            merges = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # OpenAI's simple_tokenizer takes these
    alphabet = list(bytes_to_unicode().values())
    vocab = [*alphabet, *(a + "</w>" for a in alphabet), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    tok.save_pretrained(str(folder))  # adds tokenizer.json, as hub CLIP checkpoints have
    return tok


def write_siglip_tokenizer(folder: Path) -> object:
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(
        TOKENIZER_TEXTS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=64
    )
    fast.save_pretrained(str(folder))
    return fast


def make_clip_checkpoint(folder: Path) -> Path:
    import torch
    import transformers

    tok = write_clip_tokenizer(folder)
    text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=77)
    text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(str(folder))
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(str(folder))
    return folder


def make_siglip_checkpoint(folder: Path) -> Path:
    import torch
    import transformers

    tok = write_siglip_tokenizer(folder)
    text = dict(TOWER, vocab_size=len(tok), max_position_embeddings=64, pad_token_id=1, eos_token_id=1)
    config = transformers.SiglipConfig(text_config=text, vision_config=VISION)
    torch.manual_seed(0)
    transformers.SiglipModel(config).eval().save_pretrained(str(folder))
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


CLAP_TOKENIZER_TEXTS = [
    "a dog barks in the distance",
    "rain falls on a tin roof",
    "the sound of a piano in a small room",
    "a car engine starts and idles",
    "birds sing at dawn near the river",
    "people talking in a crowded cafe",
]


def write_clap_tokenizer(
    folder: Path, texts: list[str] = CLAP_TOKENIZER_TEXTS, vocab_size: int = 300, max_length: int = 64
) -> None:
    """A byte-level BPE trained on ``texts``, as a RoBERTa tokenizer (<s> </s> <pad>=1), saved with
    tokenizer.json like a real CLAP checkpoint."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = transformers.RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_length)
    tok.save_pretrained(folder)


def _randomise(model: object) -> None:
    import torch

    """Move every weight and BatchNorm statistic off its initial value (zero position biases, unit variances
    would hide a wrong index or axis)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))


def tiny_clap_parts(fusion: bool = False) -> tuple[object, object]:
    """A tiny ClapModel checkpoint folder: RoBERTa hidden 32 x 2 layers; HTSAT with 2 stages of 2 blocks (shifted
    windows included), window 4; projection 16. Unfused: 16 mel bins, spec_size 64 (4 time chunks stacked as in the
    released models), 1 s at 16 kHz. Fused: 64 mel bins (fusion hard-codes 64), spec_size 64."""
    import transformers

    n_mels, hop = (64, 256) if fusion else (16, 160)
    config = transformers.ClapConfig(
        text_config={
            "vocab_size": 300,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 66,
        },
        audio_config={
            "num_mel_bins": n_mels,
            "spec_size": 64,
            "window_size": 4,
            "patch_size": 4,
            "patch_stride": [4, 4],
            "patch_embeds_hidden_size": 16,
            "hidden_size": 32,
            "depths": [2, 2],
            "num_attention_heads": [2, 4],
            "enable_fusion": fusion,
            "fusion_type": "aff_2d" if fusion else None,
        },
        projection_dim=16,
    )
    extractor = transformers.ClapFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=16_000,
        hop_length=hop,
        max_length_s=1,
        fft_window_size=512,
        frequency_min=50,
        frequency_max=8_000,
        truncation="fusion" if fusion else "rand_trunc",
        padding="repeatpad",
    )
    return config, extractor


def make_clap_checkpoint(folder: Path, fusion: bool = False) -> object:
    """A tiny random ClapModel checkpoint folder (see ``tiny_clap_parts``), weights moved off their init."""
    import torch
    import transformers

    config, extractor = tiny_clap_parts(fusion)
    torch.manual_seed(0)
    model = transformers.ClapModel(config).eval()
    _randomise(model)
    model.save_pretrained(folder)
    write_clap_tokenizer(folder)
    extractor.save_pretrained(folder)
    return model
