"""What every exporter shares: one tower = a torch module exported to ONNX and checked against torch
(``TowerExport`` / ``export_towers``), the text-tower plumbing of the Hugging Face exporters, and the bundle's
last step (``finish_bundle``).

Needs the ``export`` extra (torch, transformers, onnx). Uses the dynamo exporter: with torch 2.13 and
transformers 5 the legacy TorchScript exporter produced BERT graphs that were silently wrong.
A bundle is only written when every ONNX graph reproduces the torch model on shapes it was not traced on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import ModelManifest, Preprocessing, TextPreprocessing, Tower, publish_bundle
from models.errors import ExportError, MissingDependency, ParityError
from models.files import staging_dir
from models.runtime import create_session, import_onnxruntime
from models.text import TextPreprocessor

log = logging.getLogger(__name__)

OUTPUTS = ["embedding", "tokens", "token_mask"]
# Parity: every row's cosine to the torch output, and the largest element difference.
MIN_COSINE = 0.9999
MAX_ABS = 1e-4
# Texts of different lengths than the trace, so the dynamic axes are really exercised.
PARITY_TEXTS = [
    "A photograph of a red bicycle leaning against a brick wall.",
    "jet",
    "The boundary layer over a swept wing thickens towards the trailing edge under an adverse gradient.",
    "Two dogs play in the snow",
    "what is the lift coefficient of a thin aerofoil at small angles of attack?",
]


def import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependency(
            "exporting a model needs torch and transformers: `pip install 'xmodal[export]'`"
        ) from exc
    return torch, transformers


def _rename_outputs(model_proto: Any, wanted: list[str]) -> None:
    """Give the graph outputs their contract names. The exporter may already use such a name for an
    internal value (aten::embedding is called "embedding"; a constant-folded one becomes an initializer
    of that name), so internal clashes are renamed first."""
    graph = model_proto.graph
    produced = {v for node in graph.node for v in node.output} | {init.name for init in graph.initializer}
    mapping = {w: f"{w}__internal" for w in wanted if w in produced}
    for out, name in zip(graph.output, wanted, strict=True):
        mapping[out.name] = name
    for node in graph.node:
        node.input[:] = [mapping.get(v, v) for v in node.input]
        node.output[:] = [mapping.get(v, v) for v in node.output]
    for value in (*graph.output, *graph.initializer, *graph.value_info):
        value.name = mapping.get(value.name, value.name)


def export_onnx(
    torch: Any,
    module: Any,
    path: Path,
    example: tuple,
    input_names: list[str],
    dynamic_shapes: dict,
    output_names: list[str] = OUTPUTS,
) -> None:
    """Dynamo-export ``module`` on ``example`` to one self-contained ONNX file at ``path`` whose outputs carry
    the contract names, fused for ONNX Runtime where the fused graph still runs and agrees on ``example``.
    Shared by every exporter (sentence-transformers, CLIP / SigLIP, ...); parity is the caller's job."""
    import onnx

    raw = path.with_suffix(".raw.onnx")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # The exporter warns about axis renaming and prints its progress: none of it is for our user.
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4
            logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)  # "Skipping constant folding" xN
            torch.onnx.export(
                module,
                example,
                str(raw),
                dynamo=True,
                input_names=input_names,
                output_names=[f"out_{o}" for o in output_names],
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; say which model failed
        raise ExportError(f"torch.onnx.export failed: {exc}") from exc
    proto = onnx.load(str(raw))  # pulls external weight data back in: one self-contained file
    _rename_outputs(proto, output_names)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    for leftover in path.parent.glob(raw.name + "*"):
        leftover.unlink()
    _fuse_checked(path, {n: t.numpy() for n, t in zip(input_names, example, strict=True)})


def _fuse_checked(path: Path, feed: dict[str, np.ndarray]) -> None:
    """Fuse ``path`` for ONNX Runtime, keeping the unfused graph when the fused one does not run or gives other
    numbers on ``feed``: a fusion is an optimisation, never a reason to fail or change an export. (onnxscript
    0.7 turns the Transpose + MatMul of nn.MultiheadAttention, as in SigLIP's pooling head, into a FusedMatMul
    that ONNX Runtime rejects.)"""
    unfused = path.with_name(path.stem + ".unfused.onnx")
    shutil.copyfile(path, unfused)
    try:
        _fuse_for_onnxruntime(path)
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a failure is reported once, below, not as an ONNX Runtime error log
        want, got = (
            ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, feed)
            for p in (unfused, path)
        )
        problem = next(
            (
                f"output {i} differs"
                for i, (w, g) in enumerate(zip(want, got, strict=True))
                if not np.allclose(w, g, atol=1e-5)
            ),
            None,
        )
    except Exception as exc:  # the rewriter and ONNX Runtime raise many types
        problem = f"{type(exc).__name__}: {str(exc)[:300]}"
    if problem is None:
        unfused.unlink()
    else:
        log.warning("ONNX Runtime fusions broke %s (%s); keeping the unfused graph", path.name, problem)
        os.replace(unfused, path)


def _fuse_for_onnxruntime(path: Path) -> None:
    """Fuse attention, SkipLayerNorm and BiasGelu into ONNX Runtime's contrib ops (onnxscript's rewriter,
    which knows the dynamo exporter's patterns; ORT's own optimiser fuses no attention in these graphs).
    About 10% faster at batch 32 on CPU. The parity check runs on the fused graph."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(path))
    with contextlib.redirect_stdout(io.StringIO()):
        fused, counts = optimize_for_ort(model)
    log.info("ONNX Runtime fusions: %s", {k: v for k, v in counts.items() if v})
    ir.save(fused, str(path))


def check_tower_parity(
    torch: Any, module: Any, onnx_path: Path, feeds: list[dict[str, np.ndarray]], tower: str, trace_shape: list[int]
) -> dict:
    """Torch module vs ONNX graph on ``feeds`` (dicts in the graph's input order): per-row cosine and largest
    element difference of ``embedding`` and of the real ``tokens``, exact ``token_mask``. Raises ParityError."""
    session, providers = create_session(onnx_path, device="cpu")
    names = [i.name for i in session.get_inputs()]
    worst_cos, worst_abs, shapes = 1.0, 0.0, []
    for feed in feeds:
        shapes.append(list(feed[names[0]].shape))
        with torch.inference_mode():
            ref = [t.numpy() for t in module(*(torch.from_numpy(feed[n]) for n in names))]
        try:
            got = session.run(OUTPUTS, {n: feed[n] for n in names})
        except Exception as exc:  # onnxruntime's errors have no common public base class
            raise ParityError(f"{tower} tower: ONNX Runtime cannot run the graph at {shapes[-1]}: {exc}") from exc
        if not np.array_equal(ref[2], got[2]):
            raise ParityError(f"{tower} tower: token_mask differs between torch and ONNX; no bundle written")
        mask = ref[2].astype(bool)
        for r, g in ((ref[0], got[0]), (ref[1][mask], got[1][mask])):  # padding tokens are not compared
            if r.shape != g.shape:
                raise ParityError(f"{tower} tower: ONNX gives shape {g.shape}, torch {r.shape}; no bundle written")
            cos = (r * g).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1) + 1e-12)
            worst_cos = min(worst_cos, float(cos.min()))
            worst_abs = max(worst_abs, float(np.abs(r - g).max()))
    report = {
        "min_cosine": worst_cos,
        "max_abs_diff": worst_abs,
        "shapes": shapes,
        "trace_shape": trace_shape,
        "providers": providers,
        "thresholds": {"min_cosine": MIN_COSINE, "max_abs_diff": MAX_ABS},
    }
    if worst_cos < MIN_COSINE or worst_abs > MAX_ABS:
        raise ParityError(
            f"{tower} tower: ONNX graph differs from torch: min row cosine {worst_cos:.6f} (need >= {MIN_COSINE}), "
            f"max |diff| {worst_abs:.2e} (need <= {MAX_ABS:g}); no bundle written",
            **report,
        )
    return report


def write_tokenizer(source: Path, dest: Path) -> None:
    """``tokenizer.json`` into the bundle: copied when the checkpoint has one, else the fast backend's."""
    if (source / "tokenizer.json").is_file():
        shutil.copyfile(source / "tokenizer.json", dest)
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source))
        backend = tok.backend_tokenizer  # only fast (tokenizers-library) tokenizers have one
    except Exception as exc:  # ImportError (sentencepiece), OSError, AttributeError: all mean "no fast one"
        raise ExportError(
            f"{source} has no tokenizer.json and transformers could not give a fast tokenizer for it ({exc}); "
            "save one with `AutoTokenizer.from_pretrained(...).save_pretrained(...)` where that works"
        ) from exc
    backend.save(str(dest))


def tokenizer_setting(source: Path, key: str) -> Any:
    """A tokenizer setting from tokenizer_config.json or special_tokens_map.json (str, or {"content": str})."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = source / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
    return None


# --- one tower, several towers ---------------------------------------------------------------------------------


def tower_module(torch: Any, name: str, forward: Callable, **children: Any) -> Any:
    """An eval-mode torch module called ``name`` that holds ``children`` (the checkpoint's model, ...) as submodules
    and runs ``forward(self, *inputs)``, whose parameter names are the graph's input names (torch.export keys the
    dynamic shapes on them)."""
    module = type(name, (torch.nn.Module,), {"forward": forward})()
    for key, child in children.items():
        setattr(module, key, child)
    return module.eval()


def tower_outputs(torch: Any, embedding: Any, tokens: Any, mask: Any) -> tuple:
    """The contract's outputs: ``embedding`` and ``tokens`` L2-normalised, ``token_mask`` int32."""
    normalize = torch.nn.functional.normalize
    return normalize(embedding, dim=-1), normalize(tokens, dim=-1), mask.to(torch.int32)


@dataclass
class TowerExport:
    """One tower to export: ``module`` (outputs ``embedding``, ``tokens``, ``token_mask``) traced on ``example``
    (tensors in ``inputs`` order) with ``dynamic`` axes ({input: {axis: torch.export.Dim}}), then checked against
    torch on ``feeds`` (numpy dicts of other shapes than the trace). ``context`` wraps the export only (a traceable
    stand-in for a module part); parity always runs against the unmodified module."""

    modality: str
    module: Any
    example: tuple
    inputs: list[str]
    dynamic: dict
    feeds: list[dict[str, np.ndarray]]
    preprocessing: Preprocessing
    emits_tokens: bool = True
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    trace_shape: list[int] = field(default_factory=list)

    @property
    def onnx(self) -> str:
        return f"{self.modality}.onnx"


def export_towers(torch: Any, tmp: Path, specs: list[TowerExport]) -> tuple[dict[str, Tower], dict, int]:
    """Export and parity-check every tower into staging folder ``tmp``: (manifest towers, parity reports, the joint
    embedding width). Raises ParityError on a mismatch and ExportError when the towers' widths differ."""
    towers, parity, dims = {}, {}, {}
    for spec in specs:
        with spec.context():
            export_onnx(torch, spec.module, tmp / spec.onnx, spec.example, spec.inputs, spec.dynamic)
        trace = spec.trace_shape or list(spec.example[0].shape)
        parity[spec.modality] = check_tower_parity(
            torch, spec.module, tmp / spec.onnx, spec.feeds, spec.modality, trace
        )
        towers[spec.modality] = Tower(
            onnx=spec.onnx,
            inputs=spec.inputs,
            outputs=OUTPUTS,
            emits_tokens=spec.emits_tokens,
            preprocessing=spec.preprocessing,
        )
        with torch.inference_mode():  # the joint space's width, as the graph really emits it
            dims[spec.modality] = int(spec.module(*spec.example)[0].shape[-1])
    if len(set(dims.values())) != 1:
        raise ExportError(f"the towers' embeddings differ in width: {dims}")
    return towers, parity, next(iter(dims.values()))


# --- text towers of Hugging Face checkpoints ---------------------------------------------------------------------


TEXT_TRACE = (2, 8)  # the text trace's (batch, length); parity uses other shapes


def text_example(torch: Any, vocab_size: int, inputs: list[str]) -> tuple:
    """Fixed ids (so a checkpoint exports to the same bytes) inside the vocabulary, one padded row; one tensor per
    name in ``inputs`` (input_ids, then attention_mask / token_type_ids where the graph takes them)."""
    batch, length = TEXT_TRACE
    ids = torch.arange(3, 3 + batch * length).remainder(vocab_size).reshape(batch, length)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, length // 2 :] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(by_name[n] for n in inputs)


def text_feeds(bundle_dir: Path, pre: TextPreprocessing, inputs: list[str], long_text: str | None = None) -> list[dict]:
    """The bundle's own preprocessing on batches unlike the trace (one text truncated to max_length when
    ``long_text``), plus (for fixed-length padding) the same texts padded per batch, so the graph's dynamic length
    is exercised too."""
    texts = [*PARITY_TEXTS, *([long_text] if long_text else [])]
    own = TextPreprocessor.from_config(bundle_dir, pre)
    feeds = [own(b) for b in (texts, texts[1:2], texts[:3])]
    if pre.pad_to_max_length:
        ragged = TextPreprocessor(bundle_dir / pre.tokenizer, pre.max_length, False, pre.pad_id)
        # a one-word batch too: a long text may reach max_length unpadded, so texts[:5] alone can give one length
        feeds += [ragged(texts[:5]), ragged(texts[1:2])]
    return [{n: a for n, a in feed.items() if n in inputs} for feed in feeds]


def text_tower(
    torch: Any,
    module: Any,
    tmp: Path,
    pre: TextPreprocessing,
    inputs: list[str],
    vocab_size: int,
    max_length: int | None = None,
    long_text: str | None = None,
    example: tuple | None = None,
) -> TowerExport:
    """A text tower traced with dynamic batch and length (bounded by ``max_length``, the position embeddings'), on
    ``example`` (default ``text_example``), checked on the bundle's own tokenizer output (the tokenizer must already
    be in ``tmp``)."""
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=max_length) if max_length else torch.export.Dim("sequence")
    return TowerExport(
        modality="text",
        module=module,
        example=example or text_example(torch, vocab_size, inputs),
        inputs=inputs,
        dynamic={n: {0: batch, 1: seq} for n in inputs},
        feeds=text_feeds(tmp, pre, inputs, long_text),
        preprocessing=pre,
        trace_shape=list(TEXT_TRACE),
    )


def pad_id_of(source: Path, tokenizer: Any) -> int | None:
    """The checkpoint tokenizer's pad token id (tokenizer_config.json / special_tokens_map.json), or None."""
    pad_token = tokenizer_setting(source, "pad_token")
    return tokenizer.token_to_id(pad_token) if isinstance(pad_token, str) else None


def declared_max_length(source: Path) -> int | None:
    """The tokenizer's ``model_max_length`` when it is a real limit (transformers writes 1e30 for "none")."""
    declared = tokenizer_setting(source, "model_max_length")
    return int(declared) if isinstance(declared, int | float) and 0 < declared < 1e6 else None


# --- the bundle -------------------------------------------------------------------------------------------------


def finish_bundle(tmp: Path, models_dir: Path, *, source: dict, **fields: Any) -> ModelManifest:
    """The last step of every export: ``publish_bundle`` (``fields``: name, version, dim, towers, parity) with the
    torch and transformers versions that made the graphs recorded in ``source``."""
    torch, transformers = import_torch()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return publish_bundle(tmp, models_dir, source={**source, **versions}, **fields)


def export_bundle(
    torch: Any,
    models_dir: Path,
    name: str,
    version: str,
    towers: Callable[[Path], list[TowerExport]],
    source: dict,
    reference: Callable[[Path], dict[str, dict]] | None = None,
) -> ModelManifest:
    """An export once the checkpoint is loaded: in a staging folder, ``towers(tmp)`` writes what the towers need
    there (the tokenizer) and says which towers to export; each is exported and checked against torch; then
    ``reference(tmp)``, where given, checks the staged bundle against the model's own library ({tower: report}, kept
    as the tower's parity ``reference``; it raises ParityError on a mismatch). The bundle is published (atomically)
    only when every check passes."""
    with staging_dir(models_dir, name) as tmp:
        entries, parity, dim = export_towers(torch, tmp, towers(tmp))
        for tower, report in (reference(tmp) if reference else {}).items():
            parity[tower]["reference"] = report
        manifest = finish_bundle(
            tmp, models_dir, name=name, version=version, dim=dim, towers=entries, source=source, parity=parity
        )
    log.info("exported %s to %s (parity: %s)", source.get("path", source.get("kind")), models_dir / name, parity)
    return manifest
