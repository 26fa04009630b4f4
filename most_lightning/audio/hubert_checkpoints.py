"""Read HuBERT weights from the formats they ship in, into torchaudio's layout + a `HubertArch`.

Formats (format="auto" tells them apart):
- "fairseq": a torch.save'd dict {"model": state dict, "cfg": {"model": ..., "task": ...}} (fairseq >= 0.10, e.g.
  mHuBERT-base-25Hz, hubert_base_ls960) or {"model", "args": argparse.Namespace} (older fairseq). Besides
  tensors these files hold plain containers, an `argparse.Namespace`, numpy scalars/arrays (training meters)
  and `fairseq.data.dictionary.Dictionary` objects (task_state: the k-means label dictionaries). They are
  read with torch.load(weights_only=True) and an allow-list of exactly those globals; the fairseq Dictionary is
  rebuilt as an inert attribute bag (`FairseqDictionaryStub`), fairseq is never imported and no other code
  runs. Anything else (e.g. a pickled omegaconf DictConfig) is refused with the global's name.
- "hf": a transformers `HubertModel` / `HubertForCTC` directory: config.json (model_type "hubert") +
  model.safetensors (or pytorch_model.bin, read weights-only).
- "torchaudio": a torchaudio `Wav2Vec2Model` state dict as .safetensors whose metadata holds the architecture
  (written by `save_torchaudio_checkpoint`), or a .pt {"arch": {...}, "state_dict": {...}}; a bare state dict
  needs `arch=` (a preset name or dict).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .hubert import HubertArch, arch_from_any

ARCH_METADATA_KEY = "most_lightning.hubert_arch"


class HubertCheckpointError(ValueError):
    """A HuBERT checkpoint that cannot be used; names the file (and key) and says what to do."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"HuBERT checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


class FairseqDictionaryStub:
    """Stands in for fairseq.data.dictionary.Dictionary when unpickling: receives its attributes
    (symbols, count, indices, ...) and has no behaviour."""


# The non-tensor globals a real fairseq checkpoint holds, and nothing else. Tuples map the name written in the
# pickle to the object that is built instead (numpy 1.x pickles say numpy.core, numpy 2.x numpy._core).
_np_core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
FAIRSEQ_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    (FairseqDictionaryStub, "fairseq.data.dictionary.Dictionary"),
    np.dtype,
    np.ndarray,
    (_np_core.scalar, "numpy.core.multiarray.scalar"),
    (_np_core.scalar, "numpy._core.multiarray.scalar"),
    (_np_core._reconstruct, "numpy.core.multiarray._reconstruct"),
    (_np_core._reconstruct, "numpy._core.multiarray._reconstruct"),
]
_DTYPE_CLASSES = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
FAIRSEQ_SAFE_GLOBALS += _DTYPE_CLASSES


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu",
                    extra_safe_globals: Iterable[Any] = ()) -> Any:
    """torch.load(weights_only=True) with the fairseq allow-list; a refused global becomes a clear error."""
    try:
        with torch.serialization.safe_globals([*FAIRSEQ_SAFE_GLOBALS, *extra_safe_globals]):
            return torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exn:
        found = re.search(r"GLOBAL (\S+)", str(exn))
        what = f"global {found.group(1)!r}" if found else "an object"
        raise HubertCheckpointError(
            os.fspath(path), f"refusing to unpickle {what}: only tensors, plain containers, argparse.Namespace, "
            "numpy scalars/arrays and fairseq Dictionary objects are allowed (torch.load weights_only=True). "
            "If you trust the file, re-save it in a trusted environment with plain types, e.g. "
            "torch.save({'model': ck['model'], 'cfg': OmegaConf.to_container(ck['cfg'])}, out)") from exn
    except (RuntimeError, EOFError, OSError) as exn:
        raise HubertCheckpointError(os.fspath(path), f"cannot read it with torch.load ({exn})") from exn


@dataclass
class HubertCheckpoint:
    arch: HubertArch
    state_dict: dict[str, torch.Tensor]  # torchaudio Wav2Vec2Model layout
    format: str
    path: str


# ============================================================================================ conv stack
def parse_conv_layers(spec: str | list, path: str = "?", key: str = "conv_feature_layers") -> tuple:
    """fairseq's conv stack string, e.g. "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", WITHOUT eval:
    only list/tuple literals of integers joined by + and * are accepted."""
    if not isinstance(spec, str):
        return tuple(tuple(int(x) for x in layer) for layer in spec)

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
        return tuple(tuple(int(x) for x in layer) for layer in layers)
    except (SyntaxError, ValueError, TypeError) as exn:
        raise HubertCheckpointError(path, f"{key}={spec!r} is not a list of (channels, kernel, stride) ({exn})")


# ============================================================================================ fairseq
_FAIRSEQ_DROP = re.compile(r"^(label_embs_concat|mask_emb|final_proj\.|target_glu\.|quantizer\.|project_q\.)")
_FAIRSEQ_RULES = [
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"post_extract_proj\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    (r"layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.transformer.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.weight_g", r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.weight_v", r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.((?:k|v|q|out)_proj\.(?:weight|bias))", r"encoder.transformer.layers.\1.attention.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.transformer.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.transformer.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.transformer.layers.\1.final_layer_norm.\2"),
]
_FAIRSEQ_RULES = [(re.compile(p + "$"), r) for p, r in _FAIRSEQ_RULES]


def _map_keys(state: dict[str, torch.Tensor], rules, drop: re.Pattern, path: str, layout: str) -> dict:
    out, unknown = {}, []
    for key, value in state.items():
        if drop.match(key):
            continue
        for pattern, repl in rules:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise HubertCheckpointError(path, f"keys not in the {layout} HuBERT layout: {unknown[:6]}"
                                    f"{' ...' if len(unknown) > 6 else ''} (a checkpoint of another layout?)")
    return out


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _fairseq_arch(model_cfg: Any, task_cfg: Any, path: str, where: str) -> HubertArch:
    name = _cfg_get(model_cfg, "_name") or _cfg_get(model_cfg, "arch") or ""
    if "hubert" not in str(name):
        raise HubertCheckpointError(path, f"{where}._name={name!r}: not a fairseq HuBERT pretraining model "
                                    "(fine-tuned 'hubert_ctc' and wav2vec2 checkpoints are not supported)")
    required = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "encoder_ffn_embed_dim")
    missing = [k for k in required if _cfg_get(model_cfg, k) is None]
    if missing:
        raise HubertCheckpointError(path, f"{where} lacks {missing}")
    mode = _cfg_get(model_cfg, "extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        raise HubertCheckpointError(path, f"{where}.extractor_mode={mode!r}; supported: 'default', 'layer_norm'")
    for key, want in (("activation_fn", "gelu"), ("layer_type", "transformer"), ("conv_pos_batch_norm", False)):
        value = _cfg_get(model_cfg, key, want)
        if value != want:
            raise HubertCheckpointError(path, f"{where}.{key}={value!r} is not supported (torchaudio's HuBERT "
                                        f"needs {want!r})")
    return HubertArch(
        conv_layers=parse_conv_layers(_cfg_get(model_cfg, "conv_feature_layers",
                                               "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"),
                                      path, f"{where}.conv_feature_layers"),
        extractor_mode="group_norm" if mode == "default" else "layer_norm",
        conv_bias=bool(_cfg_get(model_cfg, "conv_bias", False)),
        embed_dim=int(_cfg_get(model_cfg, "encoder_embed_dim")),
        num_layers=int(_cfg_get(model_cfg, "encoder_layers")),
        num_heads=int(_cfg_get(model_cfg, "encoder_attention_heads")),
        ff_dim=int(_cfg_get(model_cfg, "encoder_ffn_embed_dim")),
        pos_conv_kernel=int(_cfg_get(model_cfg, "conv_pos", 128)),
        pos_conv_groups=int(_cfg_get(model_cfg, "conv_pos_groups", 16)),
        layer_norm_first=bool(_cfg_get(model_cfg, "layer_norm_first", False)),
        normalize_waveform=bool(_cfg_get(task_cfg, "normalize", False)),
        sample_rate=int(_cfg_get(task_cfg, "sample_rate", 16_000)),
    )


def read_fairseq(path: str, obj: dict) -> HubertCheckpoint:
    if not isinstance(obj.get("model"), dict):
        raise HubertCheckpointError(path, "no 'model' state dict (expected a fairseq checkpoint dict)")
    if obj.get("cfg") is not None:
        cfg = obj["cfg"]
        if not isinstance(cfg, dict) or "model" not in cfg:
            raise HubertCheckpointError(path, "key 'cfg' has no 'model' section")
        arch = _fairseq_arch(cfg["model"], cfg.get("task") or {}, path, "cfg.model")
    elif obj.get("args") is not None:
        arch = _fairseq_arch(obj["args"], obj["args"], path, "args")
    else:
        raise HubertCheckpointError(path, "neither 'cfg' nor 'args' holds the model config")
    state = _map_keys(obj["model"], _FAIRSEQ_RULES, _FAIRSEQ_DROP, path, "fairseq")
    if arch.conv_layers[0][0] == arch.embed_dim and "encoder.feature_projection.projection.weight" not in state:
        raise HubertCheckpointError(path, "no post_extract_proj (conv width == embed dim) is not supported")
    return HubertCheckpoint(arch, state, "fairseq", path)


# ============================================================================================ transformers
_HF_DROP = re.compile(r"^(masked_spec_embed|lm_head\.|projector\.|classifier\.)")
_HF_RULES = [
    (r"feature_extractor\.(.*)", r"feature_extractor.\1"),
    (r"feature_projection\.(layer_norm|projection)\.(weight|bias)", r"encoder.feature_projection.\1.\2"),
    (r"encoder\.pos_conv_embed\.conv\.weight_g", r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv_embed\.conv\.weight_v", r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.(.*)", r"encoder.transformer.\1"),
]
_HF_RULES = [(re.compile(p + "$"), r) for p, r in _HF_RULES]


def read_hf_dir(path: str) -> HubertCheckpoint:
    d = Path(path)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise HubertCheckpointError(path, "no config.json (expected a transformers HubertModel directory)")
    cfg = json.loads(config_path.read_text())
    where = str(config_path)
    if cfg.get("model_type") != "hubert":
        raise HubertCheckpointError(where, f"model_type={cfg.get('model_type')!r}, expected 'hubert'")
    for key, want in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu"), ("feat_proj_layer_norm", True),
                      ("conv_pos_batch_norm", False), ("use_weighted_layer_sum", False)):
        if cfg.get(key, want) != want:
            raise HubertCheckpointError(where, f"{key}={cfg.get(key)!r} is not supported (needs {want!r})")
    norm = cfg.get("feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        raise HubertCheckpointError(where, f"feat_extract_norm={norm!r}; supported: 'group', 'layer'")
    arch = HubertArch(
        conv_layers=tuple(zip(cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"])),
        extractor_mode="group_norm" if norm == "group" else "layer_norm", conv_bias=bool(cfg.get("conv_bias", False)),
        embed_dim=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]), ff_dim=int(cfg["intermediate_size"]),
        pos_conv_kernel=int(cfg["num_conv_pos_embeddings"]), pos_conv_groups=int(cfg["num_conv_pos_embedding_groups"]),
        layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)))
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state, weights = load_file(str(d / "model.safetensors")), d / "model.safetensors"
    elif (d / "pytorch_model.bin").is_file():
        weights = d / "pytorch_model.bin"
        state = safe_torch_load(weights)
    else:
        raise HubertCheckpointError(path, "no model.safetensors or pytorch_model.bin (sharded HuBERT checkpoints "
                                    "are not supported)")
    if any(k.startswith("hubert.") for k in state):  # HubertForCTC / HubertForSequenceClassification
        state = {k[len("hubert."):]: v for k, v in state.items() if k.startswith("hubert.")}
    return HubertCheckpoint(arch, _map_keys(state, _HF_RULES, _HF_DROP, str(weights), "transformers"), "hf", path)


# ============================================================================================ torchaudio
def save_torchaudio_checkpoint(model: torch.nn.Module, arch: HubertArch, path: str | os.PathLike) -> None:
    """A torchaudio Wav2Vec2Model's weights as safetensors, with the architecture in the file's metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path), metadata={ARCH_METADATA_KEY: json.dumps(arch.to_dict())})


def read_torchaudio(path: str, obj: Any = None, arch: Any = None) -> HubertCheckpoint:
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
        if arch is None and ARCH_METADATA_KEY in meta:
            arch = json.loads(meta[ARCH_METADATA_KEY])
    else:
        obj = safe_torch_load(path) if obj is None else obj
        if isinstance(obj, dict) and "state_dict" in obj:
            arch = obj.get("arch", arch) if arch is None else arch
            state = obj["state_dict"]
        else:
            state = obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HubertCheckpointError(path, "not a torchaudio state dict (name -> tensor)")
    if arch is None:
        raise HubertCheckpointError(path, "a bare torchaudio state dict does not say its architecture: pass "
                                    "arch='base' / 'base_25hz' / a dict of HubertArch fields, or save it with "
                                    "save_torchaudio_checkpoint")
    if not any(k.startswith("encoder.transformer.") for k in state):
        raise HubertCheckpointError(path, f"no 'encoder.transformer.*' keys (has {sorted(state)[:4]} ...): not a "
                                    "torchaudio HuBERT state dict")
    return HubertCheckpoint(arch_from_any(arch), dict(state), "torchaudio", path)


# ============================================================================================ dispatch
FORMATS = ("auto", "fairseq", "hf", "torchaudio")


def read_hubert_checkpoint(path: str | os.PathLike, format: str = "auto", map_location: Any = "cpu",
                           arch: Any = None) -> HubertCheckpoint:
    path = os.fspath(path)
    if format not in FORMATS:
        raise ValueError(f"HuBERT checkpoint format must be one of {FORMATS}, got {format!r}")
    if not os.path.exists(path):
        raise HubertCheckpointError(path, "no such file or directory")
    if format == "hf" or (format == "auto" and os.path.isdir(path)):
        return read_hf_dir(path)
    if format == "torchaudio" or (format == "auto" and path.endswith(".safetensors")):
        return read_torchaudio(path, arch=arch)
    obj = safe_torch_load(path, map_location)
    if not isinstance(obj, dict):
        raise HubertCheckpointError(path, f"holds a {type(obj).__name__}, not a checkpoint dict")
    if format == "fairseq" or (format == "auto" and "model" in obj and ("cfg" in obj or "args" in obj)):
        return read_fairseq(path, obj)
    return read_torchaudio(path, obj, arch)
