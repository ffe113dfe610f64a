"""How the fuzzing harness reads a container and judges the result: :func:`read_everything`
(verify, every level and associated image through open_slide, decompress to TIFF, the fidelity
map), :func:`reference` (the reads of an unmutated container), and :func:`classify`: one case's
reads against the reference, as one of :data:`OUTCOMES`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.fuzz_mutations import GEOMETRY_KINDS, UNDETECTABLE_KINDS

FAILURES = ("traceback", "hang", "crash", "memory", "wrong_pixels", "multiline", "harness_error")
OUTCOMES = ("error", "no_effect", "undetectable") + FAILURES


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(repr((a.shape, str(a.dtype))).encode() + a.tobytes()).hexdigest()[:24]


class CaseTimeout(BaseException):
    """Raised by SIGALRM in the worker: a BaseException, so no ``except Exception`` in the
    product swallows it."""


def read_everything(path: Path, tmp: Path) -> dict[str, Any]:
    """Read ``path`` every way a user would; per operation, either ``{"px": digest}``
    (pixels read), ``{"ok": True}`` / ``{"damage": [...]}`` (verify) or the exception
    (``{"exc": ...}``: raised, not caught here, when it is not a WsiCodecError)."""
    import tifffile

    import wsicodec
    from wsicodec.errors import WsiCodecError
    from wsicodec.readback import decompress, verify

    out: dict[str, Any] = {}
    shapes: dict[str, Any] = {}

    def op(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except WsiCodecError as e:
            out[name] = {"error": type(e).__name__, "message": str(e)}

    def do_verify() -> dict:
        r = verify(path, decode=True)
        if r.ok:
            return {"ok": True}
        return {"damage": [m for *_, m in r.damaged_levels] + [m for *_, m in r.damaged_tiles]
                + [m for _, m in r.damaged_associated]}

    op("verify", do_verify)

    def do_slide() -> dict:
        res: dict[str, Any] = {}
        with wsicodec.open_slide(path, workers=1) as s:
            for lv in range(s.level_count):
                def one(lv: int = lv) -> dict:
                    # RGBA: the digests recorded before RGB became as_array's default
                    a = s.read_region((0, 0), lv, s.level_dimensions[lv], as_array=True,
                                      rgba=True)
                    shapes[f"level{lv}"] = a
                    return {"px": _digest(a)}
                op_into(res, f"level{lv}", one)
            for name in list(s.associated_images):
                def assoc(name: str = name) -> dict:
                    a = np.asarray(s.associated_images[name])
                    shapes[f"assoc:{name}"] = a
                    return {"px": _digest(a)}
                op_into(res, f"assoc:{name}", assoc)
        return res

    def op_into(res: dict, name: str, fn: Callable[[], Any]) -> None:
        try:
            res[name] = fn()
        except WsiCodecError as e:
            res[name] = {"error": type(e).__name__, "message": str(e)}

    op("slide", do_slide)

    def do_tiff() -> dict:
        t = tmp / "out.tiff"
        decompress(path, t, workers=1, overwrite=True)
        with tifffile.TiffFile(t) as tf:
            # every page (one per level): tifffile's series leaves out a reduced page whose
            # size is not a pyramid step of the one before (a forged level size makes one)
            levels = [page.asarray() for page in tf.pages]
        t.unlink()
        for i, a in enumerate(levels):
            shapes[f"tiff{i}"] = a
        return {"px": [_digest(a) for a in levels]}

    op("decompress", do_tiff)

    def do_fidelity() -> dict:
        # format 4's map as readers give it: kind names, kinds and PSNRs per level (nbytes
        # follow the tiles, checked by every tile read above); format 1-3: none
        with wsicodec.open_container(path) as c:
            maps = [c.tile_records(lv) for lv in range(c.level_count)]
            if maps[0] is None:
                return {"px": "no map"}
            return {"px": [[list(m.kind_names), _digest(m.kind), _digest(m.psnr)] for m in maps]}

    op("fidelity", do_fidelity)
    out["_arrays"] = shapes
    return out


def _flat(res: dict) -> dict[str, Any]:
    """{operation: outcome} with the slide's reads one per entry."""
    flat = {}
    for k, v in res.items():
        if k == "_arrays":
            continue
        if k == "slide" and isinstance(v, dict) and "error" not in v:
            for kk, vv in v.items():
                flat[f"slide.{kk}"] = vv
        else:
            flat[k] = v
    return flat


def classify(kind: str, res: dict, ref: dict) -> tuple[str, str]:
    """(outcome, detail) of one case's reads against the reference reads."""
    flat, flat_ref = _flat(res), _flat(ref)
    errors, differs = [], []
    for name, v in flat.items():
        if "error" in v:
            if "\n" in v["message"]:
                return "multiline", f"{name}: {v['error']}: {v['message'][:300]!r}"
            if _mentions_memory(v["message"]):
                return "memory", f"{name}: {v['error']}: {v['message'][:300]}"
            errors.append(f"{name}: {v['error']}: {v['message'][:200]}")
        elif "damage" in v:
            for m in v["damage"]:
                if "\n" in m:
                    return "multiline", f"verify: {m[:300]!r}"
                if _mentions_memory(m):
                    return "memory", f"verify: {m[:300]}"
            errors.append(f"verify: {len(v['damage'])} damaged: {v['damage'][0][:200]}")
        elif v != flat_ref.get(name):
            differs.append(name)
    extra = sorted(set(flat_ref) - set(flat))
    if differs:
        what = f"pixels differ without error in {', '.join(differs)}"
        if kind in GEOMETRY_KINDS:       # forged metadata: only its sizes may differ
            if all(_same_where_both(res["_arrays"], ref["_arrays"], d) for d in differs):
                return "undetectable", what + " (other sizes; the pixels they share equal)"
        elif kind in UNDETECTABLE_KINDS:
            return "undetectable", what
        return "wrong_pixels", what + (f" (also: {errors[0]})" if errors else "")
    if errors:
        return "error", errors[0]
    if extra:   # e.g. an associated image no longer listed: metadata a forger may write
        what = f"reads fine but lacks {', '.join(extra)}"
        return ("undetectable", what) if kind in UNDETECTABLE_KINDS else ("wrong_pixels", what)
    return "no_effect", ""


def _same_where_both(arrays: dict, ref_arrays: dict, op: str) -> bool:
    """Whether the arrays an operation read equal the reference's where both have pixels
    (a forged level size crops or extends a level; it must not move or alter a pixel)."""
    keys = [op.split(".", 1)[1]] if op.startswith("slide.") else [k for k in ref_arrays
                                                                   if k.startswith("tiff")]
    for k in keys:
        a, b = arrays.get(k), ref_arrays.get(k)
        if a is None or b is None or a.ndim != b.ndim or a.shape[2:] != b.shape[2:]:
            return False
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        if not np.array_equal(a[:h, :w], b[:h, :w]):
            return False
    return True


def _mentions_memory(message: str) -> bool:
    return "Unable to allocate" in message or "MemoryError" in message


def reference(base: Path, scratch: Path) -> dict:
    """The reads of an unmutated base container; fails loudly if it is not clean."""
    ref = read_everything(base, scratch)
    flat = _flat(ref)
    bad = {k: v for k, v in flat.items() if "error" in v or "damage" in v}
    if bad:
        raise RuntimeError(f"the unmutated container {base} does not read cleanly: {bad}")
    return ref
