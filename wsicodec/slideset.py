"""The slides a tile server serves: :class:`SlideSet` (by URL name), :class:`ServedSlide`
(one open slide, its DeepZoom generator and what the server shows of it), and
:func:`render_tile` (one DeepZoom tile, encoded).

:mod:`wsicodec.server` routes HTTP requests to these; they know nothing of HTTP but
:class:`~wsicodec.httpd.HttpError` for a slide name that is not served.
"""

from __future__ import annotations

import io
import re
import threading
from http import HTTPStatus
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from wsicodec.errors import InvalidSettingError, RegionOutOfBoundsError
from wsicodec.fidelity import viewer_index
from wsicodec.httpcache import container_identity
from wsicodec.httpd import HttpError

if TYPE_CHECKING:
    from wsicodec.server import ServerSettings


def slide_name(path: Path) -> str:
    """The URL name of a container: its file name without ``.zarr.zip`` / ``.zarr``,
    characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-``."""
    name = path.name
    for suffix in (".zarr.zip", ".zarr", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")
    return name or "slide"


class _Only(Mapping[str, Any]):
    """A mapping seen through a list of the keys it may show (lazy values stay lazy)."""

    def __init__(self, mapping: Mapping[str, Any], keys: Iterable[str]) -> None:
        self._mapping, self._keys = mapping, tuple(keys)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ServedSlide:
    """One open slide and its DeepZoom generator.

    ``properties`` and ``associated_names`` are what the server shows of the slide:
    with ``settings.deidentify``, what a de-identified copy would keep (the reader that
    DeepZoom wraps then reports only those too), computed once, so that a replaced
    DICOM UID stays the same for the server's lifetime.
    """

    def __init__(self, name: str, path: Path, settings: ServerSettings) -> None:
        from openslide.deepzoom import DeepZoomGenerator

        from wsicodec.slide import WsiSlide
        from wsicodec.container import open_container

        self.name, self.path = name, path
        self.slide = WsiSlide(open_container(path), settings.decoder)
        try:
            meta = self.slide.container.metadata
            names = tuple(meta.associated_images)
            properties = dict(self.slide.properties)
            if settings.deidentify:
                from wsicodec.deidentify import deidentify_properties, dropped_associated_images

                dropped = set(dropped_associated_images(names))
                names = tuple(n for n in names if n not in dropped)
                properties = deidentify_properties(properties, meta.source_vendor)[0]
                self.slide.properties = MappingProxyType(properties)
                self.slide.associated_images = _Only(self.slide.associated_images, names)
            self.properties: Mapping[str, str] = MappingProxyType(properties)
            self.associated_names: tuple[str, ...] = names
            #: what the ETags of this slide's resources are made from (wsicodec.httpcache)
            self.identity = container_identity(
                self.slide.container, settings.jpeg_quality, settings.overlap,
                settings.deidentify, settings.decoder.precision)
            tile = self.slide.container.tile_size
            self.deepzoom = DeepZoomGenerator(self.slide, tile_size=tile - 2 * settings.overlap,
                                              overlap=settings.overlap, limit_bounds=False)
        except BaseException:
            self.slide.close()
            raise
        self._associated: dict[tuple[str, str], bytes] = {}   # (image, format) -> encoded
        self._associated_lock = threading.Lock()

    def associated_urls(self) -> dict[str, str]:
        """name -> URL of each associated image: PNG where the container holds it
        losslessly (the label), JPEG otherwise."""
        meta = self.slide.container.metadata
        return {n: f"/slides/{self.name}/associated/{n}."
                   + ("png" if meta.associated_formats.get(n, "png") == "png" else "jpeg")
                for n in self.associated_names}

    def associated_image(self, image: str, fmt: str, jpeg_quality: int) -> bytes:
        """An associated image encoded as ``fmt`` ("jpeg" or "png"), kept once made.

        Raises KeyError for a name the slide does not have or does not show
        (``associated_names``), CorruptDataError if its stored bytes are damaged.
        """
        if image not in self.associated_names:
            raise KeyError(image)
        key = (image, fmt)
        with self._associated_lock:
            body = self._associated.get(key)
        if body is None:
            from PIL import Image

            rgb = self.slide.container.read_associated_image(image)
            body = encode_image(Image.fromarray(rgb), fmt, jpeg_quality)
            with self._associated_lock:
                self._associated[key] = body
        return body

    def summary(self) -> dict[str, Any]:
        w, h = self.slide.dimensions
        props = self.properties
        mpp = props.get("openslide.mpp-x")
        return {"name": self.name, "dzi": f"/slides/{self.name}.dzi",
                "properties": f"/slides/{self.name}/properties", "width": w, "height": h,
                "levels": self.slide.level_count,
                "mpp": float(mpp) if mpp else None,
                "codec": props.get("wsicodec.codec"),
                "associated_images": self.associated_urls(),
                "fidelity": viewer_index(self.slide.container, f"/slides/{self.name}/fidelity/")}

    def preload(self) -> None:
        """Load the codec (torch and the model for the learned codec) now, not on the
        first tile request. Raises what building the codec raises."""
        _ = self.slide.decoder.device

    def close(self) -> None:
        self.slide.close()


class SlideSet:
    """The slides a server serves, by URL name. Closes them all on :meth:`close`.

    Raises (from the constructor) as :func:`wsicodec.slide.open_slide`, and
    InvalidSettingError for an empty list.
    """

    def __init__(self, paths: Iterable[str | Path], settings: ServerSettings) -> None:
        self.settings = settings
        self.slides: dict[str, ServedSlide] = {}
        try:
            for p in paths:
                path = Path(p)
                base = name = slide_name(path)
                n = 2
                while name in self.slides:
                    name, n = f"{base}-{n}", n + 1
                self.slides[name] = ServedSlide(name, path, settings)
        except BaseException:
            self.close()
            raise
        if not self.slides:
            raise InvalidSettingError("no slides to serve")

    def get(self, name: str) -> ServedSlide:
        try:
            return self.slides[name]
        except KeyError:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no slide named {name!r}") from None

    def close(self) -> None:
        for s in self.slides.values():
            s.close()


def render_tile(served: ServedSlide, level: int, col: int, row: int, fmt: str,
                jpeg_quality: int) -> bytes:
    """One DeepZoom tile, encoded.

    Raises:
        RegionOutOfBoundsError: level or address outside the DeepZoom pyramid.
        CorruptTileError: a stored tile under it is damaged.
    """
    check_tile_address(served, level, col, row)
    return encode_image(served.deepzoom.get_tile(level, (col, row)), fmt, jpeg_quality)


def check_tile_address(served: ServedSlide, level: int, col: int, row: int) -> None:
    """Raises RegionOutOfBoundsError unless (level, col, row) is a DeepZoom tile of
    ``served`` (nothing is decoded)."""
    dz = served.deepzoom
    if not 0 <= level < dz.level_count:
        raise RegionOutOfBoundsError(f"DeepZoom level {level} outside 0..{dz.level_count - 1}")
    cols, rows = dz.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise RegionOutOfBoundsError(f"tile ({col}, {row}) outside the {cols}x{rows} tiles "
                                     f"of DeepZoom level {level}")


def encode_image(image: Any, fmt: str, jpeg_quality: int) -> bytes:
    """A PIL image as JPEG (``jpeg_quality``) or PNG (fast deflate) bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=jpeg_quality)
    else:
        image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
