"""Save and load inference checkpoints of :class:`~wsicodec.model.WsiHyperprior`.

An inference checkpoint is a ``torch.save`` dict::

    {"format": "wsicodec-model", "version": 1,
     "config": ModelConfig.to_dict(), "state_dict": ..., "provenance": {...}}

with the CDF tables already frozen (``model.update()`` ran before saving).  The
model id is the sha256 of the file's bytes; it is written into every container
and every image stream, and data made with other weights is refused.

Shipped weights live in ``wsicodec/weights/`` and load offline.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidSettingError, ModelMismatchError, WsiCodecError

FORMAT = "wsicodec-model"
VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "wsicodec-hyperprior.pt"
#: environment variable that points at another weights file
WEIGHTS_ENV = "WSICODEC_MODEL"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network ready to code, with its id and the entropy tables as integers."""

    model: "object"          #: WsiHyperprior in eval mode, CDF tables frozen
    model_id: str            #: sha256 hex of the checkpoint file
    path: Path
    provenance: dict

    def check_id(self, other_id: str, what: str = "data") -> None:
        """Raise :class:`ModelMismatchError` unless ``other_id`` names these weights.

        ``other_id`` may be a prefix of the sha256 (tile headers keep 8 bytes).
        """
        if not self.model_id.startswith(other_id.lower()):
            raise ModelMismatchError(
                f"{what} was made with model {other_id[:16]}..., but the loaded model is "
                f"{self.model_id[:16]}... ({self.path.name}); open it with the same weights")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_weights_path() -> Path:
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else DEFAULT_WEIGHTS


_cache: dict[Path, LoadedModel] = {}
_lock = threading.Lock()


def load_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load (once per path, then cached) an inference checkpoint on the CPU.

    Raises:
        InvalidSettingError: the file is missing or is not a wsicodec model.
    """
    p = Path(path) if path is not None else default_weights_path()
    p = p.resolve()
    with _lock:
        if p in _cache:
            return _cache[p]
        if not p.is_file():
            raise InvalidSettingError(f"model weights not found: {p}")
        import torch

        from .model import ModelConfig, WsiHyperprior
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many kinds on a bad file
            raise InvalidSettingError(f"{p} is not a readable model checkpoint ({exc.__class__.__name__})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise InvalidSettingError(f"{p} is not a wsicodec model (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
        if state.get("version") != VERSION:
            raise InvalidSettingError(f"{p}: model format version {state.get('version')} is not supported (expected {VERSION})")
        model = WsiHyperprior(ModelConfig.from_dict(state["config"]))
        _load_coding_state(model, state["state_dict"])
        model.eval()
        loaded = LoadedModel(model, sha256_file(p), p, dict(state.get("provenance", {})))
        _cache[p] = loaded
        return loaded


def _load_coding_state(model, state_dict: dict) -> None:
    """load_state_dict, resizing the CDF buffers that ``update()`` allocates lazily."""
    for name in ("entropy_bottleneck", "gaussian_conditional"):
        module = getattr(model, name)
        for buf in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
            key = f"{name}.{buf}"
            if key in state_dict:
                setattr(module, buf, state_dict[key].clone())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_h_s64_cache")]
    if missing or unexpected:
        raise WsiCodecError(f"checkpoint does not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.gaussian_conditional._quantized_cdf.numel() == 0:
        raise WsiCodecError("checkpoint has no frozen CDF tables; export it with train/export.py")


def export(train_checkpoint: str | os.PathLike, out: str | os.PathLike, provenance: dict | None = None) -> str:
    """Turn a training checkpoint into an inference checkpoint; return its sha256.

    Freezes the CDF tables (quantiles by bisection), drops optimiser state and
    writes atomically.
    """
    import torch

    from .model import ModelConfig, WsiHyperprior
    state = torch.load(train_checkpoint, map_location="cpu", weights_only=False)
    model = WsiHyperprior(ModelConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"], strict=False)
    model.eval()
    with torch.no_grad():
        model.update()
    prov = {"train_step": state.get("step"), "train_wall_s": state.get("wall"),
            "train_args": state.get("args")}
    prov.update(provenance or {})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
                "state_dict": model.state_dict(), "provenance": prov}, tmp)
    os.replace(tmp, out)
    return sha256_file(out)


__all__ = ["LoadedModel", "load_model", "export", "sha256_file", "default_weights_path",
           "ModelMismatchError"]
