"""Save and load inference checkpoints of :class:`~wsicodec.learned.network.WsiHyperprior`.

An inference checkpoint is a ``torch.save`` dict of plain data and tensors only::

    {"format": "wsicodec-model", "version": 1,
     "config": ModelConfig.to_dict(), "state_dict": {name: tensor},
     "provenance": {JSON-able data}}

with the CDF tables already frozen (``model.update()`` ran before saving).  The
model id is the sha256 of the file's bytes; it is written into every container
and every image stream, and data made with other weights is refused.

Trust: weights are code-free data.  :func:`load_model` reads them with
``torch.load(..., weights_only=True)`` (no arbitrary unpickling: a file holding any
other object is refused) and checks the header's types before it builds the network;
:func:`wsicodec.export.export` writes only such data and checks that its output loads
that way.

Where weights come from: a path a caller gives (the Python API, ``get_codec(...,
model=...)``: the caller's own file), or, for data to decode, the *model id* it
records, looked up among trusted places only (:func:`find_weights`): the shipped
file and folder, ``$WSICODEC_MODEL``, and any ``*.pt`` in the folders named by
``$WSICODEC_MODEL_DIR``.  A path read from a container or a stream is never opened
(:func:`wsicodec.codecs.codec_from_dict` drops it).  ``weights/history.json`` lists
every model id that was ever shipped and where its file lives in the git history, so
a refusal can say how to get it back.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidSettingError, ModelMismatchError

FORMAT = "wsicodec-model"
VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "wsicodec-hyperprior.pt"
#: environment variable that points at another weights file
WEIGHTS_ENV = "WSICODEC_MODEL"
#: environment variable: folders (``os.pathsep``-separated) searched by model id
WEIGHTS_DIRS_ENV = "WSICODEC_MODEL_DIR"
HISTORY = WEIGHTS_DIR / "history.json"
#: buffers that ``update()`` sizes when it freezes the CDF tables (per entropy model)
FROZEN_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
#: the keys of a checkpoint's ``config`` (``ModelConfig.to_dict()``); N, M, lambdas required
CONFIG_KEYS = ("N", "M", "lambdas", "enc_blocks", "dec_blocks", "reconstruction")
#: a model id: the sha256 in hex, or a prefix of it (tile headers keep 16 hex digits)
MODEL_ID_RE = re.compile(r"^[0-9a-f]{16,64}$")


_copies_lock = threading.Lock()


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network ready to code, with its id and the entropy tables as integers."""

    model: "object"          #: WsiHyperprior in eval mode, CDF tables frozen
    model_id: str            #: sha256 hex of the checkpoint file
    path: Path
    provenance: dict
    #: copies of :attr:`model` on other devices, made by :meth:`on`
    _copies: dict = field(default_factory=dict, repr=False)

    def on(self, device) -> "object":
        """The network on ``device`` (a ``torch.device``): :attr:`model` itself on the CPU,
        elsewhere one copy per device, made on first use and shared by every codec and
        decoder of these weights.  Only g_a, h_a and g_s run on it: the entropy parameters
        (ẑ → μ, table index) always use :attr:`model` on the CPU, so the symbols never
        depend on the device."""
        import torch

        device = torch.device(device)
        if device.type == "cpu":
            return self.model
        if device.type == "cuda" and device.index is None:   # "cuda" and "cuda:0" are one copy
            device = torch.device("cuda", torch.cuda.current_device())
        with _copies_lock:
            if str(device) not in self._copies:
                import copy

                with torch.inference_mode(False):
                    self._copies[str(device)] = copy.deepcopy(self.model).to(device).eval()
            return self._copies[str(device)]

    def decodes(self, other_id: str) -> bool:
        """Whether data made with ``other_id`` decodes with these weights exactly.

        True for these weights' own id, and for the ids in ``provenance["decodes_for"]``:
        weights whose decoder (g_s, h_s, entropy models, gains) this file holds bit
        for bit, checked when it was exported (an encoder retrained with
        ``train.py --freeze-decoder``, or the same weights given a reconstruction κ or
        a retuned g_s (``export --synthesis``): the same symbols, the pixels as this
        file's κ and g_s make them).  ``other_id`` may be a prefix of the sha256
        (tile headers keep 8 bytes).
        """
        other = str(other_id).lower()
        if not other:
            return False
        return any(i.startswith(other) for i in (self.model_id, *self.decodes_for))

    @property
    def decodes_for(self) -> tuple[str, ...]:
        return tuple(str(i).lower() for i in self.provenance.get("decodes_for", ()) or ())

    def check_id(self, other_id: str, what: str = "data") -> None:
        """Raise :class:`ModelMismatchError` unless data made with ``other_id`` decodes here."""
        if not self.decodes(other_id):
            raise ModelMismatchError(
                f"{what} was made with model {other_id[:16]}..., but the loaded model is "
                f"{self.model_id[:16]}... ({self.path.name}); {_where_to_find(other_id)}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_sha_cache: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = sha256_file(path)
    return _sha_cache[key]


def weights_search_path() -> list[Path]:
    """Candidate weights files, in the order :func:`find_weights` tries them."""
    files = [default_weights_path(), DEFAULT_WEIGHTS, *sorted(WEIGHTS_DIR.glob("*.pt"))]
    for folder in filter(None, os.environ.get(WEIGHTS_DIRS_ENV, "").split(os.pathsep)):
        files.extend(sorted(Path(folder).expanduser().glob("*.pt")))
    seen, out = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen and r.is_file():
            seen.add(r)
            out.append(r)
    return out


def find_weights(model_id: str) -> Path | None:
    """The weights file whose sha256 starts with ``model_id`` (hex), or None.

    Looks in the trusted places only: ``$WSICODEC_MODEL``, the shipped weights folder,
    and every ``*.pt`` in the folders of ``$WSICODEC_MODEL_DIR`` (hashes are cached by
    size and mtime).  Never a path that came with the data.  An id that is not 16..64
    hex digits finds nothing.
    """
    model_id = model_id.lower() if isinstance(model_id, str) else ""
    if not MODEL_ID_RE.match(model_id):
        return None
    for f in weights_search_path():
        try:
            if _cached_sha256(f).startswith(model_id):
                return f
        except OSError:
            continue
    return None


def shipped_history() -> list[dict]:
    """Every model id shipped so far (``weights/history.json``), newest last."""
    try:
        return list(json.loads(HISTORY.read_text())["models"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _where_to_find(model_id: str) -> str:
    for entry in shipped_history():
        if str(entry.get("model_id", "")).startswith(model_id.lower()):
            return (f"those weights shipped with wsicodec {entry.get('shipped', '')} (git {entry.get('git_commit', '?')}:"
                    f"{entry.get('path', 'wsicodec/weights/wsicodec-hyperprior.pt')}); put that file in a folder "
                    f"named by ${WEIGHTS_DIRS_ENV} (or point ${WEIGHTS_ENV} at it)")
    return (f"put the weights it was made with in a folder named by ${WEIGHTS_DIRS_ENV} "
            f"(or point ${WEIGHTS_ENV} at them)")


def load_model_for(model_id: str | None, path: str | os.PathLike | None = None) -> "LoadedModel":
    """The weights to decode data made with ``model_id``.

    ``path``: a weights file the *caller* chose (never one read from the data): it must
    exist and hold those weights (or their decoder: see :meth:`LoadedModel.decodes`).
    Without it the weights are looked up by id among the trusted places
    (:func:`find_weights`), and failing that the default weights are taken if they hold
    that decoder; else :class:`ModelMismatchError` names both ids and where to put the
    weights, or :class:`InvalidSettingError` when no weights file exists at all.
    """
    if model_id is None:
        return load_model(path)
    model_id = check_model_id(model_id)
    if path is None:
        found = find_weights(model_id)
        if found is not None:
            loaded = load_model(found)
            if loaded.decodes(model_id):     # the file may have changed since it was hashed
                return loaded
    loaded = load_model(path)            # raises when no weights file exists
    loaded.check_id(model_id, "this data")
    return loaded


def check_model_id(model_id: Any) -> str:
    """``model_id`` in lower case if it is a sha256 in hex (or a prefix of at least 16
    digits), else :class:`InvalidSettingError`."""
    mid = model_id.lower() if isinstance(model_id, str) else None
    if mid is None or not MODEL_ID_RE.match(mid):
        raise InvalidSettingError(f"a model id is a sha256 in hex (16 to 64 digits), got {model_id!r:.80}")
    return mid


def default_weights_path() -> Path:
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else DEFAULT_WEIGHTS


_cache: dict[Path, LoadedModel] = {}
_lock = threading.Lock()


def load_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load (once per path, then cached) an inference checkpoint on the CPU.

    ``path`` (default: :func:`default_weights_path`) is a file the caller trusts to be
    *weights*; it is still read as data only: ``torch.load(weights_only=True)``, so a
    file that holds any other object (a pickled function, a class) is refused, never
    run.  The header's types are checked before the network is built, and the model id
    is the sha256 of the very bytes that were loaded.

    Raises:
        InvalidSettingError: the file is missing or is not a wsicodec model (names why).
    """
    p = Path(path) if path is not None else default_weights_path()
    p = p.expanduser().resolve()
    with _lock:
        if p in _cache:
            return _cache[p]
        if not p.is_file():
            raise InvalidSettingError(f"model weights not found: {p}")
        import torch

        from .learned.network import ModelConfig, WsiHyperprior
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InvalidSettingError(f"model weights unreadable: {p} ({exc.strerror or exc})") from None
        state = load_plain(io.BytesIO(data), p)
        config = check_header(state, p)
        try:
            model = WsiHyperprior(ModelConfig.from_dict(config))
            _load_coding_state(model, state["state_dict"])
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:   # tensors of other shapes
            raise InvalidSettingError(f"{p}: its tensors do not fit the network its config describes "
                                      f"({' '.join(str(exc).split())[:200]})") from None
        # inference only: an output that needs no gradient holds no autograd graph (a
        # latent divided by a gain kept the undivided latent alive beside it)
        model.eval().requires_grad_(False)
        loaded = LoadedModel(model, hashlib.sha256(data).hexdigest(), p, dict(state.get("provenance") or {}))
        _cache[p] = loaded
        return loaded


def load_plain(source: Any, name: object) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU: tensors and plain data only.

    Raises InvalidSettingError (one line) for a file that holds other objects or is not
    a torch file at all."""
    import pickle

    import torch
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):      # torch's words for a refused class or function
            raise InvalidSettingError(f"{name} is not a readable model checkpoint (UnpicklingError)") from None
        raise InvalidSettingError(f"{name} holds objects other than tensors and plain data: refused "
                                  "(weights are loaded with torch.load(weights_only=True))") from None
    except Exception as exc:  # torch raises many kinds on a bad file
        raise InvalidSettingError(f"{name} is not a readable model checkpoint ({exc.__class__.__name__})") from None


def check_header(state: Any, name: object = "checkpoint") -> dict:
    """Check the types of an inference checkpoint loaded with weights_only; return its config.

    format and version, ``config`` (a dict of exactly :data:`CONFIG_KEYS`' types, sizes
    in sane ranges), ``state_dict`` (str -> tensor), ``provenance`` (a dict, if any;
    its ``decodes_for`` a list of model ids).

    Raises:
        InvalidSettingError: one line naming the file and what is wrong.
    """
    import torch

    def bad(what: str) -> InvalidSettingError:
        return InvalidSettingError(f"{name} is not a wsicodec model: {what}")

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InvalidSettingError(f"{name} is not a wsicodec model (format {got!r:.60})")
    if state.get("version") != VERSION:
        raise InvalidSettingError(f"{name}: model format version {state.get('version')!r:.20} is not "
                                  f"supported (expected {VERSION})")
    config = state.get("config")
    if not isinstance(config, dict):
        raise bad(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
    if unknown:
        raise bad(f"config has keys this release does not know ({', '.join(unknown)[:100]}): "
                  "made by a newer wsicodec?")

    def integer(key: str, lo: int, hi: int, default: int | None = None) -> None:
        v = config.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise bad(f"config {key} must be an integer in {lo}..{hi}, got {v!r:.40}")

    def numbers(key: str, lo: int, hi: int, positive: bool) -> None:
        v = config.get(key, [])
        if (not isinstance(v, (list, tuple)) or not lo <= len(v) <= hi
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                           and (x > 0 or not positive) for x in v)):
            raise bad(f"config {key} must be a list of {lo}..{hi} finite{' positive' if positive else ''} "
                      f"numbers, got {v!r:.60}")

    integer("N", 1, 4096)
    integer("M", 1, 4096)
    integer("enc_blocks", 0, 64, 0)
    integer("dec_blocks", 0, 64, 0)
    numbers("lambdas", 1, 256, positive=True)
    numbers("reconstruction", 0, 256, positive=False)
    sd = state.get("state_dict")
    if not isinstance(sd, dict) or not sd:
        raise bad(f"state_dict must be a non-empty dict of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise bad(f"state_dict must map names to tensors, got {type(k).__name__} -> {type(v).__name__}")
    prov = state.get("provenance")
    if prov is not None:
        if not isinstance(prov, dict):
            raise bad(f"provenance must be a dict, got {type(prov).__name__}")
        dec = prov.get("decodes_for")
        if dec is not None and not (isinstance(dec, (list, tuple)) and all(
                isinstance(i, str) and MODEL_ID_RE.match(i.lower()) for i in dec)):
            raise bad("provenance decodes_for must be a list of model ids (sha256 hex)")
    return config


def _load_coding_state(model, state_dict: dict) -> None:
    """load_state_dict, resizing the CDF buffers that ``update()`` allocates lazily."""
    for name in ("entropy_bottleneck", "gaussian_conditional"):
        module = getattr(model, name)
        for buf in FROZEN_TABLES:
            key = f"{name}.{buf}"
            if key in state_dict:
                setattr(module, buf, state_dict[key].clone())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise InvalidSettingError(f"checkpoint does not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.gaussian_conditional._quantized_cdf.numel() == 0:
        raise InvalidSettingError("checkpoint has no frozen CDF tables; export it with train/export.py")


__all__ = ["LoadedModel", "load_model", "load_model_for", "find_weights", "shipped_history",
           "sha256_file", "default_weights_path", "check_header", "check_model_id", "load_plain",
           "weights_search_path", "ModelMismatchError"]
