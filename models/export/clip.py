"""Export a Hugging Face ``CLIPModel`` or ``SiglipModel`` checkpoint folder to a two-tower xmodal bundle.

Each tower is one ONNX graph with the bundle contract's outputs, all L2-normalised:

text (CLIP inputs ``input_ids, attention_mask``; SigLIP input ``input_ids``)
  ``embedding`` [B, D]  exactly ``get_text_features(...).pooler_output`` (pooled and projected).
  ``tokens`` [B, T, D]  every position's last hidden state (after the final layer norm, which both models
                        apply to all positions) through the same projection (CLIP ``text_projection``,
                        SigLIP ``text_model.head``). CLIP's embedding is thus the EOS token's vector.
  ``token_mask`` [B, T] int32; CLIP: the attention mask; SigLIP: ``input_ids != pad_id``.
image (input ``pixel_values`` [B, 3, S, S], dynamic batch only: the position embeddings fix S)
  ``embedding`` [B, D]  exactly ``get_image_features(...).pooler_output``.
  ``tokens`` [B, N, D]  one vector per patch, N = (S / patch)^2, no CLS token (see below).
  ``token_mask`` [B, N] int32, all ones.

Decisions, and why:

- CLIP image tokens exclude CLS. CLS after ``post_layernorm`` and ``visual_projection`` *is* the dense
  embedding; as a token it would duplicate the dense score inside the late-interaction max and be the best
  match for almost any query. Without it both architectures give exactly one token per image patch, so a
  token index maps to an image region. The patch tokens get the same ``post_layernorm`` and projection the
  CLS token gets.
- SigLIP image tokens: SigLIP has no CLS token and no projection; its embedding is a multihead attention
  pooling head (MAP: one learned probe attends over the patches, then out-projection, a residual MLP).
  Raw patch states are not in the joint space, so each patch goes through the head as if every attention
  head of the probe attended to that patch alone: ``o_i = out_proj(W_v x_i + b_v)``, ``t_i = o_i +
  mlp(layernorm(o_i))``. That is exactly what the head pools from a one-patch image (a softmax over one key
  is 1; the tests check it against ``vision_model.head(x[:, i:i+1])``), and the embedding is the same
  function applied to per-head convex mixes of the patches' values: the MaskCLIP argument (use the pooling
  attention's value path per patch), carried over to the MAP head.
- SigLIP text: no attention mask. SigLIP was trained on text padded to 64 tokens with the pad token
  (= EOS) attended like any other (big_vision, open_clip), and pools the *last* position, a pad token for
  short texts; masking padding would change the embedding. So the tower takes ``input_ids`` only, the
  manifest says ``pad_to_max_length`` with the tokenizer's pad id, and the tokens of a text are its non-pad
  ids (with pad == EOS, the EOS token is not among them: it cannot be told from padding).
- CLIP text: padded per batch to the longest text; the causal mask and the attention mask keep padding
  out of the real tokens, and pooling reads the first EOS, so the pad id does not matter (the tokenizer's
  is recorded anyway). The token mask is the attention mask, so BOS and EOS count as tokens, as [CLS] and
  [SEP] do in the sentence-transformers bundles (under the causal mask BOS is the same vector for every
  text: a scorer that wants content words only can drop position 0).
- Both graphs are traced with a dynamic sequence axis (<= the model's positions), and parity is checked on
  other batch sizes and lengths than the trace, padding inside batches, and (SigLIP) full 64-token rows.

SigLIP's own tokenizer is sentencepiece-based; the bundle needs a ``tokenizer.json`` (the ``tokenizers``
library, no torch at serving time). A checkpoint without one is converted through ``AutoTokenizer`` when
transformers can give a fast tokenizer, and refused otherwise. Note that SigLIP's slow tokenizer strips
punctuation before tokenizing, which a converted ``tokenizer.json`` does not do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import ImagePreprocessing, ModelManifest, TextPreprocessing
from models.errors import ExportError
from models.export.base import (
    TowerExport,
    declared_max_length,
    export_bundle,
    import_torch,
    pad_id_of,
    text_tower,
    tower_module,
    tower_outputs,
    write_tokenizer,
)
from models.image import image_config_from_hf

log = logging.getLogger(__name__)

ARCHS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
TEXT_INPUTS = {"clip": ["input_ids", "attention_mask"], "siglip": ["input_ids"]}
IMAGE_INPUTS = ["pixel_values"]
IMAGE_TRACE_BATCH = 2
PARITY_IMAGE_BATCHES = (1, 3, 5)
# One text longer than any model's positions: truncated to max_length, so the longest shape is exercised.
PARITY_LONG_TEXT = " ".join(["lift and drag over a slender delta wing"] * 20)


def detect_arch(source: Path) -> str:
    """``clip`` or ``siglip`` from the checkpoint's ``config.json`` ``model_type``."""
    config = source / "config.json"
    if not config.is_file():
        raise ExportError(f"{source} is not a Hugging Face checkpoint (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in ARCHS:
        raise ExportError(
            f"{source} holds a {model_type!r} model; export_clip handles model_type {sorted(ARCHS)} "
            "(CLIPModel, SiglipModel)"
        )
    return model_type


# --- preprocessing -------------------------------------------------------------------------------------------


def _image_preprocessing(source: Path) -> ImagePreprocessing:
    path = source / "preprocessor_config.json"
    if not path.is_file():
        raise ExportError(f"{source} has no preprocessor_config.json (the image processor's settings)")
    try:
        return image_config_from_hf(json.loads(path.read_text()))
    except ExportError as exc:
        raise ExportError(f"{path}: {exc.message}") from exc


def _text_preprocessing(source: Path, tokenizer_file: Path, arch: str, text_config: Any) -> TextPreprocessing:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    positions = int(text_config.max_position_embeddings)
    max_length = min(positions, declared_max_length(source) or positions)
    pad_id = pad_id_of(source, tok)
    if pad_id is None:
        pad_id = text_config.pad_token_id
        if arch == "siglip" or pad_id is None:  # SigLIP pads every text: the pad id must be the tokenizer's
            raise ExportError(f"cannot find the pad token of the tokenizer in {source} (tokenizer_config.json)")
    eos = text_config.eos_token_id
    if arch == "clip" and isinstance(eos, int) and eos != 2:  # 2: legacy configs pool the largest id instead
        # CLIP pools the first `eos_token_id`; a tokenizer that never emits it would pool position 0 silently.
        ids = tok.encode("a photo of a cat").ids
        if eos not in ids:
            raise ExportError(
                f"the tokenizer in {source} does not end texts with the model's eos_token_id {eos} "
                f"(it gives {ids}); text pooling would be wrong"
            )
    return TextPreprocessing(
        tokenizer="tokenizer.json", max_length=max_length, pad_to_max_length=arch == "siglip", pad_id=int(pad_id)
    )


# --- the torch towers ------------------------------------------------------------------------------------------


def _text_tower(torch: Any, model: Any, arch: str, pad_id: int) -> Any:
    if arch == "clip":

        def clip_forward(self, input_ids, attention_mask):  # noqa: ANN001
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            tokens = self.model.text_projection(out.last_hidden_state)
            return tower_outputs(torch, out.pooler_output, tokens, attention_mask)

        return tower_module(torch, "ClipTextTower", clip_forward, model=model)

    def siglip_forward(self, input_ids):  # noqa: ANN001
        out = self.model.get_text_features(input_ids=input_ids)  # no mask: trained attending to padding
        tokens = self.model.text_model.head(out.last_hidden_state)
        return tower_outputs(torch, out.pooler_output, tokens, input_ids != pad_id)

    return tower_module(torch, "SiglipTextTower", siglip_forward, model=model)


def _siglip_patch_head(torch: Any, head: Any, x: Any) -> Any:
    """The MAP head applied to each patch alone (every attention head attending to that one patch)."""
    attn = head.attention
    dim = attn.embed_dim
    w_v = attn.in_proj_weight[2 * dim :] if attn._qkv_same_embed_dim else attn.v_proj_weight
    b_v = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
    o = attn.out_proj(torch.nn.functional.linear(x, w_v, b_v))
    return o + head.mlp(head.layernorm(o))


def _image_tower(torch: Any, model: Any, arch: str) -> Any:
    def forward(self, pixel_values):  # noqa: ANN001
        out = self.model.get_image_features(pixel_values=pixel_values)
        vision = self.model.vision_model
        if arch == "clip":  # last_hidden_state is before post_layernorm; drop CLS (it is the embedding)
            tokens = self.model.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:]))
        else:  # last_hidden_state is after post_layernorm
            tokens = _siglip_patch_head(torch, vision.head, out.last_hidden_state)
        mask = torch.ones_like(tokens[..., 0], dtype=torch.int32)
        return tower_outputs(torch, out.pooler_output, tokens, mask)

    return tower_module(torch, "ImageTower", forward, model=model)


# --- parity -----------------------------------------------------------------------------------------------------


def _image_feeds(size: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"pixel_values": rng.standard_normal((b, 3, size, size)).astype(np.float32)} for b in PARITY_IMAGE_BATCHES]


# --- export -----------------------------------------------------------------------------------------------------


def _load_model(torch: Any, transformers: Any, source: Path, arch: str) -> Any:
    cls = getattr(transformers, ARCHS[arch])
    try:
        model = cls.from_pretrained(str(source)).eval()
    except Exception as exc:  # OSError, ValueError, size mismatches: say which checkpoint
        raise ExportError(f"cannot load {source} as {ARCHS[arch]}: {exc}") from exc
    if arch == "siglip" and not getattr(model.vision_model, "use_head", True):
        raise ExportError(f"{source}: vision_use_head is off, so SiglipModel has no image embedding to export")
    return model


def export_clip(
    source: Path, models_dir: Path, name: str, arch: str | None = None, version: str = "1"
) -> ModelManifest:
    """Export a local CLIPModel / SiglipModel checkpoint folder as a text + image bundle ``<models_dir>/<name>``.

    ``arch`` is ``clip`` or ``siglip``; by default it comes from config.json's ``model_type``. The bundle is
    only written (atomically) when both graphs reproduce the torch model on shapes they were not traced on.
    """
    source = Path(source)
    detected = detect_arch(source)
    arch = arch or detected
    if arch not in ARCHS:
        raise ExportError(f"unknown arch {arch!r}: choose one of {sorted(ARCHS)}")
    if arch != detected:
        raise ExportError(f"{source} holds a {detected} model, not {arch}")
    image_pre = _image_preprocessing(source)  # before torch: a bad folder fails fast
    torch, transformers = import_torch()
    model = _load_model(torch, transformers, source, arch)
    text_config, vision_config = model.config.text_config, model.config.vision_config
    image_size = int(vision_config.image_size)
    if image_pre.output_size != image_size:
        raise ExportError(f"the image processor makes {image_pre.output_size}px images, the model takes {image_size}px")

    def towers(tmp: Path) -> list[TowerExport]:
        write_tokenizer(source, tmp / "tokenizer.json")
        text_pre = _text_preprocessing(source, tmp / "tokenizer.json", arch, text_config)
        text = text_tower(
            torch,
            _text_tower(torch, model, arch, text_pre.pad_id),
            tmp,
            text_pre,
            TEXT_INPUTS[arch],
            int(text_config.vocab_size),
            max_length=int(text_config.max_position_embeddings),  # torch.export needs the positions' bound
            long_text=PARITY_LONG_TEXT,
        )
        image = TowerExport(
            modality="image",
            module=_image_tower(torch, model, arch),
            example=(_image_example(torch, image_size),),
            inputs=IMAGE_INPUTS,
            dynamic={"pixel_values": {0: torch.export.Dim("batch")}},
            feeds=_image_feeds(image_size),
            preprocessing=image_pre,
        )
        return [text, image]

    source_info = {
        "kind": f"hf-{arch}",
        "class": ARCHS[arch],
        "path": str(source),
        "image_tokens": "patch tokens, no CLS" if arch == "clip" else "patches through the MAP head",
        "text_attention_mask": arch == "clip",
    }
    return export_bundle(torch, models_dir, name, version, towers, source_info)


def _image_example(torch: Any, size: int) -> Any:
    return torch.linspace(-2, 2, IMAGE_TRACE_BATCH * 3 * size * size).reshape(IMAGE_TRACE_BATCH, 3, size, size)
