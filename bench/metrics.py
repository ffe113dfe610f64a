"""Image-quality metrics and Bjøntegaard deltas for the wsicodec benchmarks.

Everything here takes ``(h, w, 3) uint8`` RGB arrays (the decoded pixels of a codec and the
reference pixels) and returns plain floats:

- :func:`psnr` — PSNR over all RGB samples, peak 255.
- :func:`ms_ssim` — MS-SSIM (Wang et al. 2003) via ``pytorch_msssim``, mean over R, G, B. Tiles smaller
  than 161 px on a side get fewer scales with renormalised weights; :func:`ms_ssim_plan` says how many,
  so callers can report it.
- :func:`load_lpips` / :class:`Lpips` — LPIPS-alex (Zhang et al. 2018) built offline: the linear heads
  from the ``lpips`` wheel, the AlexNet trunk from a local file (``../shared/weights`` or
  ``$WSICODEC_WEIGHTS`` or torchvision's cache). Nothing is ever downloaded.
- :func:`bd_rate` — Bjøntegaard delta rate between two rate-distortion curves (pchip or cubic fit of
  log-rate against quality), and :func:`msssim_db` / :func:`lpips_db` to express MS-SSIM and LPIPS
  in dB for it.

The benchmark script ``bench/rd.py`` is the main user; ``tests/test_metrics.py`` pins the numbers.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

#: The five MS-SSIM scale weights of Wang, Simoncelli & Bovik (2003), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_WIN_SIZE = 11

#: sha256 of ``alexnet_features_imagenet.pth`` in ``../shared/weights`` (see its README).
ALEXNET_FEATURES_SHA256 = "3fd34b13e050e26387e804e7e8c3e3b6a258c442e2efecdbf3f62e938eeb12d9"
ALEXNET_FEATURES_FILE = "alexnet_features_imagenet.pth"
#: torchvision's own full AlexNet checkpoint name, accepted when a user has it in the torch hub cache.
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _check_pair(reference: np.ndarray, decoded: np.ndarray) -> None:
    if reference.shape != decoded.shape:
        raise ValueError(f"images differ in shape: reference {reference.shape}, decoded {decoded.shape}")
    if reference.ndim != 3 or reference.shape[2] != 3:
        raise ValueError(f"expected (h, w, 3) RGB arrays, got shape {reference.shape}")
    if reference.dtype != np.uint8 or decoded.dtype != np.uint8:
        raise ValueError(f"expected uint8 arrays, got {reference.dtype} and {decoded.dtype}")


# -------------------------------------------------------------------------------------------- crops

def center_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size``² of ``img`` (all of a side shorter than that); None: the whole image."""
    if not size:
        return img
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(img[top:top + size, left:left + size])


# --------------------------------------------------------------------------------------------- PSNR

def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB over all RGB samples with peak 255; ``inf`` for identical images."""
    _check_pair(reference, decoded)
    mse = np.mean((reference.astype(np.float64) - decoded.astype(np.float64)) ** 2)
    if mse == 0:
        return math.inf
    return float(10.0 * math.log10(255.0 ** 2 / mse))


def psnr_from_sse(sse: float, n: int) -> float:
    """PSNR in dB (peak 255) from a pooled sum of squared errors over ``n`` samples, for
    PSNRs of pixel sets gathered across tiles (borders, interiors); ``inf`` when sse is 0."""
    if sse == 0:
        return math.inf
    return float(10.0 * math.log10(255.0 ** 2 / (sse / n)))


# ------------------------------------------------------------------------------------------ MS-SSIM

@dataclass(frozen=True)
class MsSsimPlan:
    """How MS-SSIM is computed for one image size.

    ``scales`` is 5 (the standard) for images at least 161 px on the short side. Smaller images get the
    largest number of scales whose coarsest level still exceeds the Gaussian window, with the first
    ``scales`` standard weights renormalised to sum to 1; below 11 px the window itself shrinks.
    """

    scales: int
    win_size: int
    weights: tuple[float, ...]

    @property
    def standard(self) -> bool:
        return self.scales == len(MS_SSIM_WEIGHTS) and self.win_size == MS_SSIM_WIN_SIZE

    def describe(self) -> str:
        if self.standard:
            return "MS-SSIM: standard 5 scales, 11-px window"
        return (f"MS-SSIM: {self.scales} scale(s) (image under 161 px), window {self.win_size} px, "
                f"weights renormalised to {', '.join(f'{w:.4f}' for w in self.weights)}")


def ms_ssim_plan(height: int, width: int) -> MsSsimPlan:
    """The scales, window and weights :func:`ms_ssim` uses for an image of this size.

    pytorch_msssim needs ``min(h, w) > (win_size - 1) * 2**(scales - 1)``; we keep the largest
    ``scales`` (1..5) that satisfies it. At 5 scales the weights are the published ones as they are
    (they sum to 1.0001); fewer scales renormalise their share to 1. Raises ``ValueError`` for images
    under 3 px on a side.
    """
    side = min(height, width)
    if side < 3:
        raise ValueError(f"MS-SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    win = MS_SSIM_WIN_SIZE
    if side < win:  # not even one scale fits the 11-px window: shrink it to the largest odd size that fits
        win = side if side % 2 == 1 else side - 1
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side > (win - 1) * 2 ** scales:
        scales += 1
    if scales == len(MS_SSIM_WEIGHTS):
        return MsSsimPlan(scales=scales, win_size=win, weights=MS_SSIM_WEIGHTS)  # the published ones
    w = MS_SSIM_WEIGHTS[:scales]
    total = sum(w)
    return MsSsimPlan(scales=scales, win_size=win, weights=tuple(x / total for x in w))


def _to_tensor(image: np.ndarray, dtype: str = "float32"):
    import torch

    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).to(getattr(torch, dtype))


def ms_ssim(reference: np.ndarray, decoded: np.ndarray, dtype: str = "float32") -> float:
    """MS-SSIM of two ``(h, w, 3) uint8`` images (data range 255, mean over channels), in [0, 1].

    Computed in float32 by default (3-7x faster than float64 on a CPU; the two differed by 7e-8 on a
    1000x1000 H&E image, far below any difference we report); pass ``dtype="float64"`` to check.

    Uses ``pytorch_msssim.ms_ssim`` unchanged for images of 161 px and more; smaller images follow
    :func:`ms_ssim_plan` (fewer scales, renormalised weights) with the same per-scale SSIM and pooling,
    and log an INFO line saying so.
    """
    _check_pair(reference, decoded)
    import pytorch_msssim
    import torch

    plan = ms_ssim_plan(reference.shape[0], reference.shape[1])
    x, y = _to_tensor(reference, dtype), _to_tensor(decoded, dtype)
    with torch.no_grad():
        if plan.standard:
            value = pytorch_msssim.ms_ssim(x, y, data_range=255, size_average=True,
                                           win_size=plan.win_size, weights=list(plan.weights))
        else:
            log.info("%s for a %dx%d image", plan.describe(), reference.shape[0], reference.shape[1])
            value = _ms_ssim_scales(x, y, plan)
    return float(value)


def _ms_ssim_scales(x, y, plan: MsSsimPlan):
    """pytorch_msssim's multi-scale loop without its 161-px assertion (any number of scales)."""
    import torch
    import torch.nn.functional as F
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    win = _fspecial_gauss_1d(plan.win_size, 1.5).repeat([x.shape[1], 1, 1, 1])
    weights = x.new_tensor(plan.weights)
    mcs = []
    for level in range(plan.scales):
        ssim_per_channel, cs = _ssim(x, y, data_range=255, win=win, size_average=False)
        if level < plan.scales - 1:
            mcs.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    stacked = torch.stack(mcs + [torch.relu(ssim_per_channel)], dim=0)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean()


class MsSsimReference:
    """MS-SSIM against one fixed reference, with the reference's per-scale statistics computed once.

    ``MsSsimReference(ref).against(decoded)`` equals ``ms_ssim(ref, decoded)`` (same window, scales,
    weights and pooling as pytorch_msssim; a test pins it) at about 60 % of the cost when one reference
    is scored against many decoded images, as in a rate sweep. float32.
    """

    def __init__(self, reference: np.ndarray) -> None:
        import torch
        import torch.nn.functional as F
        from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter

        _check_pair(reference, reference)
        self.shape = reference.shape
        self.plan = ms_ssim_plan(reference.shape[0], reference.shape[1])
        self._filter = gaussian_filter
        win = _fspecial_gauss_1d(self.plan.win_size, 1.5)
        self._win3 = win.repeat([3, 1, 1, 1])
        self._win9 = win.repeat([9, 1, 1, 1])
        self._x, self._mu1, self._s11 = [], [], []
        with torch.no_grad():
            x = _to_tensor(reference, "float32")
            for level in range(self.plan.scales):
                stats = gaussian_filter(torch.cat([x, x * x], dim=1), win.repeat([6, 1, 1, 1]))
                mu1 = stats[:, :3]
                self._x.append(x)
                self._mu1.append(mu1)
                self._s11.append(stats[:, 3:] - mu1 * mu1)
                if level < self.plan.scales - 1:
                    x = F.avg_pool2d(x, kernel_size=2, padding=[s % 2 for s in x.shape[2:]])

    def against(self, decoded: np.ndarray) -> float:
        import torch
        import torch.nn.functional as F

        if decoded.shape != self.shape or decoded.dtype != np.uint8:
            raise ValueError(f"decoded image is {decoded.shape} {decoded.dtype}, reference {self.shape} uint8")
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        factors = []
        with torch.no_grad():
            y = _to_tensor(decoded, "float32")
            for level in range(self.plan.scales):
                x, mu1, s11 = self._x[level], self._mu1[level], self._s11[level]
                stats = self._filter(torch.cat([y, y * y, x * y], dim=1), self._win9)
                mu2 = stats[:, :3]
                s22 = stats[:, 3:6] - mu2 * mu2
                s12 = stats[:, 6:] - mu1 * mu2
                cs_map = (2 * s12 + c2) / (s11 + s22 + c2)
                if level < self.plan.scales - 1:
                    factors.append(torch.relu(torch.flatten(cs_map, 2).mean(-1)))
                    y = F.avg_pool2d(y, kernel_size=2, padding=[s % 2 for s in y.shape[2:]])
                else:
                    ssim_map = ((2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1)) * cs_map
                    factors.append(torch.relu(torch.flatten(ssim_map, 2).mean(-1)))
            weights = torch.tensor(self.plan.weights, dtype=torch.float32).view(-1, 1, 1)
            value = torch.prod(torch.stack(factors, dim=0) ** weights, dim=0).mean()
        return float(value)


def msssim_db(value: float | np.ndarray) -> float | np.ndarray:
    """MS-SSIM expressed in dB, ``-10 log10(1 - ms_ssim)``, the scale BD-rates on MS-SSIM use."""
    v = np.asarray(value, dtype=np.float64)
    out = -10.0 * np.log10(np.maximum(1.0 - v, 1e-12))
    return float(out) if out.ndim == 0 else out


def lpips_db(value: float | np.ndarray) -> float | np.ndarray:
    """LPIPS as an increasing quality in dB, ``-10 log10(LPIPS)``, the scale BD-rates on LPIPS use."""
    out = -10.0 * np.log10(np.maximum(np.asarray(value, dtype=np.float64), 1e-6))
    return float(out) if out.ndim == 0 else out


# -------------------------------------------------------------------------------------------- LPIPS

def _weight_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("WSICODEC_WEIGHTS")
    if env:
        dirs.append(Path(env))
    dirs.append(_REPO_ROOT.parent / "shared" / "weights")
    try:
        import torch.hub

        dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    except Exception:  # pragma: no cover - torch.hub always exists in supported torch versions
        pass
    return dirs


def find_alexnet_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate the AlexNet ``features`` trunk for LPIPS without downloading anything.

    Order: ``path`` (a file, or a directory holding ``alexnet_features_imagenet.pth``), then
    ``$WSICODEC_WEIGHTS`` (a directory), then ``../shared/weights`` next to the repository, then
    torchvision's cached ``alexnet-owt-7be5be79.pth`` in the torch hub directory.
    Raises ``FileNotFoundError`` listing every place looked at.
    """
    looked: list[Path] = []
    if path is not None:
        p = Path(path)
        candidates = [p] if p.is_file() else [p / ALEXNET_FEATURES_FILE, p / TORCHVISION_ALEXNET_FILE]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"no AlexNet weights at {p} (expected a .pth file or a directory with "
                                f"{ALEXNET_FEATURES_FILE})")
    for d in _weight_dirs():
        for name in (ALEXNET_FEATURES_FILE, TORCHVISION_ALEXNET_FILE):
            c = d / name
            looked.append(c)
            if c.is_file():
                return c
    raise FileNotFoundError(
        "AlexNet weights for LPIPS not found; set WSICODEC_WEIGHTS to a directory holding "
        f"{ALEXNET_FEATURES_FILE} (see ../shared/weights/README.md). Looked at: "
        + ", ".join(str(c) for c in looked))


def _features_state_dict(path: Path) -> dict:
    """AlexNet ``features`` state dict keyed ``"<index>.weight"``, from either supported layout."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("features.") for k in state):  # torchvision's full classifier checkpoint
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    return state


class Lpips:
    """LPIPS-alex (v0.1) on ``(h, w, 3) uint8`` images; lower is more similar.

    Build it with :func:`load_lpips`. ``__call__`` takes one pair; ``batch`` several pairs of one size.
    :meth:`reference` computes the reference's normalised AlexNet features once, and :meth:`against`
    scores decoded images against them (a sweep over one reference halves the work); the numbers are
    those of ``lpips.LPIPS.forward``. Runs in float32 on the CPU unless a device is given.
    """

    def __init__(self, net, trunk_path: Path, device: str = "cpu") -> None:
        self.net = net
        self.trunk_path = trunk_path
        self.device = device

    def _prep(self, images: Sequence[np.ndarray]):
        import torch

        arr = np.stack([np.asarray(im) for im in images])
        t = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device, torch.float32)
        return t / 127.5 - 1.0  # [-1, 1], what LPIPS expects

    def _features(self, images: Sequence[np.ndarray]) -> list:
        import lpips

        outs = self.net.net.forward(self.net.scaling_layer(self._prep(images)))
        return [lpips.normalize_tensor(o) for o in outs]

    def _distance(self, feats0: list, feats1: list) -> list[float]:
        val = 0
        for kk, (f0, f1) in enumerate(zip(feats0, feats1, strict=True)):
            val = val + self.net.lins[kk]((f0 - f1) ** 2).mean([2, 3], keepdim=True)
        return [float(v) for v in val.flatten().cpu()]

    def reference(self, reference: np.ndarray) -> list:
        """Normalised features of one reference image, for :meth:`against`."""
        import torch

        _check_pair(reference, reference)
        with torch.no_grad():
            return self._features([reference])

    def against(self, reference_features: list, reference: np.ndarray, decoded: np.ndarray) -> float:
        """LPIPS of ``decoded`` against a reference whose features :meth:`reference` computed."""
        import torch

        _check_pair(reference, decoded)
        with torch.no_grad():
            return self._distance(reference_features, self._features([decoded]))[0]

    def batch(self, references: Sequence[np.ndarray], decoded: Sequence[np.ndarray]) -> list[float]:
        import torch

        for r, d in zip(references, decoded, strict=True):
            _check_pair(r, d)
        with torch.no_grad():
            return self._distance(self._features(references), self._features(decoded))

    def __call__(self, reference: np.ndarray, decoded: np.ndarray) -> float:
        return self.batch([reference], [decoded])[0]


def load_lpips(weights: str | os.PathLike | None = None, device: str = "cpu") -> Lpips:
    """LPIPS-alex with the ImageNet trunk from a local file; never downloads.

    ``weights`` is a file or a directory (see :func:`find_alexnet_weights` for the search order). The
    linear heads come from the ``lpips`` wheel itself. The trunk is copied into ``net.slice1..5``
    and every one of its 10 tensors must load, or ``ValueError`` says which are missing.
    """
    import lpips
    import torch

    path = find_alexnet_weights(weights)
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" notes from inside lpips
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = _features_state_dict(path)
    target = net.net  # lpips.pretrained_networks.alexnet: slice1..5 hold features[0..11] by index
    loaded = set()
    with torch.no_grad():
        for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
            for index, module in getattr(target, slice_name).named_children():
                for pname, param in module.named_parameters(recurse=False):
                    key = f"{index}.{pname}"
                    if key not in state:
                        raise ValueError(f"{path}: AlexNet trunk lacks {key!r}")
                    if tuple(state[key].shape) != tuple(param.shape):
                        raise ValueError(f"{path}: {key!r} has shape {tuple(state[key].shape)}, "
                                         f"expected {tuple(param.shape)}")
                    param.copy_(state[key])
                    loaded.add(key)
    if len(loaded) != 10:
        raise ValueError(f"{path}: loaded {len(loaded)} of AlexNet's 10 conv tensors")
    net.eval().to(device)
    return Lpips(net, path, device)


# --------------------------------------------------------------------------------------- BD-rate

def _prepare_curve(rate: Sequence[float], quality: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rate, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if r.shape != q.shape or r.ndim != 1:
        raise ValueError("rate and quality must be 1-D sequences of equal length")
    keep = np.isfinite(r) & np.isfinite(q) & (r > 0)
    r, q = r[keep], q[keep]
    order = np.argsort(q, kind="stable")
    r, q = r[order], q[order]
    # pchip needs strictly increasing abscissae: merge equal qualities (keep the cheapest rate)
    uq = np.unique(q)
    lr = np.array([np.log(r[q == v]).min() for v in uq])
    return uq, lr


def bd_rate(rate_ref: Sequence[float], quality_ref: Sequence[float],
            rate_test: Sequence[float], quality_test: Sequence[float],
            method: str = "pchip") -> float:
    """Bjøntegaard delta rate of ``test`` against ``ref``, in percent (negative: test needs fewer bits).

    Fits log(rate) as a function of quality for each curve (``"pchip"``: piecewise cubic Hermite, the
    monotone variant used by JVET/AOM tools; ``"cubic"``: the original 3rd-order polynomial of
    VCEG-M33), integrates both over the overlapping quality interval and returns
    ``100 * (exp(mean difference) - 1)``. Quality is PSNR in dB, or :func:`msssim_db` of MS-SSIM.
    Returns ``nan`` when the curves do not overlap in quality or have fewer than 2 (pchip) / 4 (cubic)
    distinct points.
    """
    if method not in ("pchip", "cubic"):
        raise ValueError(f"method must be 'pchip' or 'cubic', got {method!r}")
    q1, lr1 = _prepare_curve(rate_ref, quality_ref)
    q2, lr2 = _prepare_curve(rate_test, quality_test)
    need = 4 if method == "cubic" else 2
    if len(q1) < need or len(q2) < need:
        return math.nan
    lo, hi = max(q1.min(), q2.min()), min(q1.max(), q2.max())
    if not hi > lo:
        return math.nan
    if method == "cubic":
        p1, p2 = np.polyfit(q1, lr1, 3), np.polyfit(q2, lr2, 3)
        i1, i2 = np.polyint(p1), np.polyint(p2)
        area1 = np.polyval(i1, hi) - np.polyval(i1, lo)
        area2 = np.polyval(i2, hi) - np.polyval(i2, lo)
    else:
        from scipy.interpolate import PchipInterpolator

        area1 = PchipInterpolator(q1, lr1).integrate(lo, hi)
        area2 = PchipInterpolator(q2, lr2).integrate(lo, hi)
    mean_diff = (area2 - area1) / (hi - lo)
    return float(100.0 * (math.exp(mean_diff) - 1.0))


def rate_at_equal_quality(rate_ref: Sequence[float], quality_ref: Sequence[float],
                          rate_test: Sequence[float], quality_test: Sequence[float]) -> list[float | None]:
    """For each test point, its rate against the reference curve's rate at the same quality, in
    percent (+: more bits than the reference there), the reference's log-rate interpolated
    (pchip, as :func:`bd_rate`) at the point's quality; None outside the reference's range."""
    from scipy.interpolate import PchipInterpolator

    q1, lr1 = _prepare_curve(rate_ref, quality_ref)
    out: list[float | None] = []
    for r, q in zip(rate_test, quality_test):
        if len(q1) < 2 or q is None or not (np.isfinite(q) and q1.min() <= q <= q1.max()) or not r > 0:
            out.append(None)
            continue
        out.append(float(100.0 * (math.exp(math.log(r) - float(PchipInterpolator(q1, lr1)(q))) - 1.0)))
    return out


def bd_overlap(quality_ref: Sequence[float], quality_test: Sequence[float]) -> tuple[float, float]:
    """The quality interval two curves share (where :func:`bd_rate` integrates)."""
    a, b = np.asarray(quality_ref, float), np.asarray(quality_test, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    return float(max(a.min(), b.min())), float(min(a.max(), b.max()))
