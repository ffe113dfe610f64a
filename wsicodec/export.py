"""Write inference checkpoints: :func:`export` turns a training checkpoint (or exported
weights) into the weights the codec ships, in the format :mod:`wsicodec.checkpoint` reads.

Every input is read as data only (``torch.load(weights_only=True)``, as
:func:`wsicodec.checkpoint.load_model` reads weights); the output holds tensors and plain
JSON-able data only (:func:`plain`) and is checked to load that way, and to pass
:func:`~wsicodec.checkpoint.check_header`, before it replaces its target.
``train/export.py`` is its command line.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import FORMAT, VERSION, check_header, load_model, load_plain, sha256_file
from .errors import InvalidSettingError, WsiCodecError


def plain(value: Any) -> Any:
    """``value`` as JSON-able plain data (dict with str keys, list, str, int, float,
    bool, None): what a checkpoint's provenance may hold, so that it loads with
    weights_only.  An ``argparse.Namespace`` becomes its dict, a path or anything else
    its ``str``, a tuple or set a list, a numpy or torch scalar its number."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return plain(vars(value))
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:      # numpy / torch scalars
        try:
            return plain(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def export(train_checkpoint: str | os.PathLike, out: str | os.PathLike, provenance: dict | None = None,
           decoder_of: str | os.PathLike | None = None,
           reconstruction: "Sequence[float] | None" = None,
           synthesis: str | os.PathLike | None = None) -> str:
    """Turn a training checkpoint into an inference checkpoint; return its sha256.

    Freezes the CDF tables (quantiles by bisection), drops optimiser state and
    writes atomically.  Every input is read with ``weights_only=True``; the output holds
    tensors and plain data only (the provenance, ``train_args`` included, is made
    JSON-able by :func:`plain`) and is checked to load with ``weights_only=True`` and to
    pass :func:`~wsicodec.checkpoint.check_header` before it replaces ``out``.
    ``reconstruction``: the decoder's κ per quality
    (:attr:`~wsicodec.learned.network.ModelConfig.reconstruction`, from
    ``train/tune_reconstruction.py``), stored in the config.  ``decoder_of``: shipped
    weights whose decoder this one must be, tensor for tensor (the network's size and
    λ ladder too); their id, and the ids they decode in turn, go into
    ``provenance["decodes_for"]``, so data made with them opens with the new weights.
    A decoder that differs is an error and nothing is written.

    ``train_checkpoint`` may also be an inference checkpoint (exported weights, e.g.
    from a GPU session, where the training state stays behind): its tensors and CDF
    tables are kept as they are, only ``reconstruction`` (and ``provenance``) change,
    and the file's own id joins ``decodes_for``: its data decodes to the same symbols.
    ``synthesis`` (only with such exported weights): a ``train/finetune_synthesis.py``
    checkpoint of those weights; its g_s replaces theirs, every other tensor stays, so their
    data still opens (same symbols, the pixels the new g_s makes of them).
    """
    import torch

    from .learned.network import ModelConfig
    try:
        raw = Path(train_checkpoint).read_bytes()
    except OSError as exc:
        raise InvalidSettingError(f"cannot read {train_checkpoint}: {exc.strerror or exc}") from None
    state = load_plain(io.BytesIO(raw), train_checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise InvalidSettingError(f"{train_checkpoint} is neither a training checkpoint nor exported weights")
    if state.get("format") == FORMAT:
        check_header(state, train_checkpoint)
    config = ModelConfig.from_dict(state["config"])
    if reconstruction is not None:
        kappas = tuple(float(k) for k in reconstruction)
        if not all(-4.0 <= k <= 1.0 for k in kappas):     # 1: the bin mean; < 0: past the centre
            raise InvalidSettingError(f"reconstruction κ values must lie in [-4, 1], got {kappas}")
        from dataclasses import replace

        config = replace(config, reconstruction=kappas)
    if state.get("format") == FORMAT:      # exported weights: re-export as they are
        state_dict, prov = _reexported(state, raw, provenance, decoder_of, synthesis)
    else:
        state_dict, prov = _frozen(state, config, provenance, decoder_of, synthesis)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save({"format": FORMAT, "version": VERSION, "config": plain(config.to_dict()),
                    "state_dict": state_dict, "provenance": plain(prov)}, tmp)
        check_header(load_plain(str(tmp), out), out)    # what every reader will do with it
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(out)


def _reexported(state: dict, raw: bytes, provenance: dict | None,
                decoder_of: str | os.PathLike | None,
                synthesis: str | os.PathLike | None) -> tuple[dict, dict]:
    """Exported weights' tensors (their g_s from ``synthesis``, if given) and provenance,
    their own id first in ``decodes_for``."""
    if decoder_of is not None:
        raise InvalidSettingError("decoder_of is for training checkpoints: exported weights "
                                  "keep their own decoder and list their own id")
    prov = dict(state.get("provenance") or {})
    prov.update(provenance or {})
    parent_id = hashlib.sha256(raw).hexdigest()
    prov["decodes_for"] = list(dict.fromkeys(
        [parent_id, *(str(i).lower() for i in prov.get("decodes_for") or ())]))
    state_dict = state["state_dict"]
    if synthesis is not None:
        state_dict, prov["synthesis"] = _with_synthesis(state_dict, synthesis, parent_id)
    return state_dict, prov


def _frozen(state: dict, config: Any, provenance: dict | None,
            decoder_of: str | os.PathLike | None,
            synthesis: str | os.PathLike | None) -> tuple[dict, dict]:
    """A training checkpoint's network with its CDF tables frozen, as tensors, and its
    provenance (checked against ``decoder_of``'s decoder, if given)."""
    import torch

    from .learned.network import WsiHyperprior
    if synthesis is not None:
        raise InvalidSettingError("synthesis is for exported weights: a training checkpoint "
                                  "holds its own g_s")
    model = WsiHyperprior(config)
    model.load_state_dict(state["model"], strict=False)
    model.eval()
    with torch.no_grad():
        model.update()
    prov = {"train_step": state.get("step"), "train_wall_s": state.get("wall"),
            "train_args": state.get("args")}
    prov.update(provenance or {})
    if decoder_of is not None:
        parent = load_model(decoder_of)
        _check_same_decoder(parent.model, model, parent.path.name)
        prov["decodes_for"] = [parent.model_id, *parent.decodes_for]
    return model.state_dict(), prov


def _with_synthesis(state_dict: dict, path: str | os.PathLike, parent_id: str) -> tuple[dict, dict]:
    """``state_dict`` with g_s from a ``finetune_synthesis.py`` checkpoint of these weights."""
    tuned = load_plain(str(path), path)
    if not isinstance(tuned, dict) or "g_s" not in tuned or "parent_id" not in tuned:
        raise InvalidSettingError(f"{path}: not a train/finetune_synthesis.py checkpoint")
    if tuned["parent_id"] != parent_id:
        raise InvalidSettingError(f"{path} tunes the g_s of {tuned['parent_id'][:12]}…, "
                                  f"not of these weights ({parent_id[:12]}…)")
    old = {k[len("g_s."):]: v for k, v in state_dict.items() if k.startswith("g_s.")}
    new = tuned["g_s"]
    if set(old) != set(new) or any(old[k].shape != new[k].shape for k in old):
        raise InvalidSettingError(f"{path}: its g_s does not have these weights' layers")
    out = dict(state_dict)
    out.update({f"g_s.{k}": v.detach().to(old[k].dtype).clone() for k, v in new.items()})
    return out, {"step": tuned.get("step"), "wall_s": round(float(tuned.get("wall", 0)), 1),
                 "args": tuned.get("args")}


def _check_same_decoder(parent, child, parent_name: str) -> None:
    """Raise :class:`WsiCodecError` unless ``child`` decodes exactly as ``parent``."""
    import torch
    pc, cc = parent.config, child.config
    if (pc.N, pc.M, tuple(pc.lambdas)) != (cc.N, cc.M, tuple(cc.lambdas)):
        raise WsiCodecError(f"not the decoder of {parent_name}: network size or λ ladder differs")
    ps, cs = parent.state_dict(), child.state_dict()
    for key in (k for k in ps if k.startswith(parent.DECODER_PARTS)):
        if key not in cs or ps[key].shape != cs[key].shape or not torch.equal(ps[key], cs[key]):
            raise WsiCodecError(f"not the decoder of {parent_name}: {key} differs")


__all__ = ["export", "plain"]
