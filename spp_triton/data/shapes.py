"""Deterministic synthetic "shapes" detection data, written once to disk in COCO format.

This module depends only on numpy and Pillow; the detectron2 registration lives in
:mod:`spp_triton.data`. See that package's docstring for the overview and the cache location.

Rendering, per image (one ``numpy.random.Generator`` per image, seeded from
``(seed, split, index)``, so image ``i`` of a split does not depend on how many images
the split has, and train and val never share a seed):

1. The canvas is drawn at ``SUPERSAMPLE``\\ x the output resolution (float RGB in [0, 1]) and
   box-filtered down at the end, which anti-aliases every edge.
2. Background: a linear gradient between two random colours plus one or two textures (stripes at
   a random angle and frequency, low-frequency colour blobs, a checkerboard, speckle).
3. Clutter that is *not* an object: lines, wavy curves, random-walk scribbles, dot sprays and
   jagged irregular blobs, partly transparent.
4. Objects, largest first: a class (uniform), a size bucket (small / medium / large by COCO's
   box-area thresholds 32^2 and 96^2), a log-uniform box area inside the bucket, an anisotropic
   stretch, a random rotation and a colour drawn independently of the class (HSV, resampled until
   it contrasts with the background under it), filled solid, with a gradient or with stripes and
   sometimes outlined. Later (smaller) objects may occlude earlier ones, but a placement is
   rejected if any object would keep less than ``min_visible`` of its pixels.
5. A few thin lines drawn over everything, brightness/contrast jitter, Gaussian pixel noise and
   sometimes a slight blur.

Each annotation describes the *visible* part of its object: ``bbox`` is the tight box of the
visible pixels (at super-sampled precision, so coordinates are multiples of 0.5), ``segmentation``
is the visible mask as compressed COCO RLE (a nice-to-have; detectron2 drops it unless
``MODEL.MASK_ON``) and ``area`` is the **box** area ``w * h``. COCO's own files use the mask area;
we use the box area because this is a box-detection benchmark: COCOeval buckets detections by
their box area, so the ground truth is bucketed the same way and APs/APm/APl mean
"box smaller than 32x32 / up to 96x96 / larger".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "SHAPES_CLASSES",
    "NUM_SHAPES_CLASSES",
    "GENERATOR_VERSION",
    "DATASET_BASENAME",
    "SPLITS",
    "ShapesConfig",
    "default_datasets_root",
    "shapes_dataset_dir",
    "is_complete",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
    "render_image",
    "area_bucket",
]

#: Class names; COCO category ids are ``index + 1``. Set ``MODEL.ROI_HEADS.NUM_CLASSES`` to
#: ``NUM_SHAPES_CLASSES`` (= ``len(SHAPES_CLASSES)``).
SHAPES_CLASSES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star", "cross", "hexagon")
NUM_SHAPES_CLASSES: int = len(SHAPES_CLASSES)

#: Names the cache folder (``shapes_v1``); bump it for incompatible changes of the format. The
#: fingerprint also hashes this file's source, so any edit regenerates stale caches anyway.
GENERATOR_VERSION = 1
DATASET_BASENAME = f"shapes_v{GENERATOR_VERSION}"
SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}

SUPERSAMPLE = 2  # render at this factor, then box-filter down
SMALL_MAX_AREA = 32.0**2  # COCO's thresholds (absolute pixels)
MEDIUM_MAX_AREA = 96.0**2
_ENV_ROOT = "SPP_TRITON_DATASETS"
# Any edit of this file changes the fingerprint, so caches never outlive the code that drew them.
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_META = "meta.json"  # written last; its presence + matching fingerprint = complete


@dataclass(frozen=True)
class ShapesConfig:
    """Every parameter that affects the generated files (all of it goes into the fingerprint)."""

    seed: int = 0
    num_train: int = 1500
    num_val: int = 200
    min_side: int = 120  # image width and height are drawn uniformly from [min_side, max_side]
    max_side: int = 136
    min_objects: int = 3  # objects per image, before placements that fail are dropped
    max_objects: int = 6
    # Probability of each size bucket, and the box-area range (pixels) sampled log-uniformly.
    p_small: float = 0.22
    p_medium: float = 0.53
    p_large: float = 0.25
    small_area: tuple[float, float] = (18.0**2, SMALL_MAX_AREA)
    medium_area: tuple[float, float] = (SMALL_MAX_AREA, MEDIUM_MAX_AREA)
    large_area: tuple[float, float] = (MEDIUM_MAX_AREA, 112.0**2)
    max_large_per_image: int = 1
    # Difficulty knobs.
    min_visible: float = 0.8  # an occluded object keeps at least this fraction of its pixels
    min_contrast: float = 0.5  # RGB distance (0..sqrt 3) of an object's colour from under it
    texture: float = 0.35  # scale of the background textures' amplitudes
    clutter: tuple[int, int] = (0, 2)  # distractors under the objects (min, max)
    clutter_over: tuple[int, int] = (0, 1)  # thin lines over everything (min, max)
    noise: tuple[float, float] = (0.005, 0.02)  # Gaussian pixel noise sigma range ([0, 1] scale)
    p_blur: float = 0.1

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("image counts must be >= 0")
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError("need 32 <= min_side <= max_side")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}[split]

    def fingerprint(self) -> str:
        payload = {
            "generator_version": GENERATOR_VERSION,
            "generator_source": _SOURCE_HASH,
            "classes": SHAPES_CLASSES,
        }
        payload.update(asdict(self))
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Cache location
# ----------------------------------------------------------------------------------------------


def default_datasets_root() -> Path:
    """``$SPP_TRITON_DATASETS`` if set; else ``<repo root>/datasets`` (git-ignored) when
    spp_triton runs from a source checkout; else the user cache (``~/.cache/spp_triton/datasets``)
    for an installed wheel: never inside ``site-packages``."""
    from spp_triton.model_zoo import source_checkout, user_cache_dir

    env = os.environ.get(_ENV_ROOT)
    if env:
        return Path(env).expanduser()
    checkout = source_checkout()
    if checkout is not None:
        return checkout / "datasets"
    return user_cache_dir() / "datasets"


def shapes_dataset_dir(
    root: str | os.PathLike | None = None, config: ShapesConfig | None = None
) -> Path:
    """Folder of one dataset: ``<root>/shapes_v1`` for the default config, else a folder whose
    name carries the config's fingerprint (so different configs never overwrite each other)."""
    root = default_datasets_root() if root is None else Path(root)
    config = ShapesConfig() if config is None else config
    if config == ShapesConfig():
        return root / DATASET_BASENAME
    return root / f"{DATASET_BASENAME}_{config.fingerprint()}"


def is_complete(out_dir: str | os.PathLike, config: ShapesConfig | None = None) -> bool:
    """True if ``out_dir`` holds a finished dataset generated with ``config``."""
    out_dir = Path(out_dir)
    config = ShapesConfig() if config is None else config
    try:
        meta = json.loads((out_dir / _META).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("fingerprint") != config.fingerprint():
        return False
    return all((out_dir / f"{s}.json").is_file() and (out_dir / s).is_dir() for s in SPLITS)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def area_bucket(area: float) -> str:
    """COCO's size bucket of an area: "small" (< 32^2), "medium" (< 96^2) or "large"."""
    if area < SMALL_MAX_AREA:
        return "small"
    if area < MEDIUM_MAX_AREA:
        return "medium"
    return "large"


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_polygon(cls: str, rng: np.random.Generator) -> np.ndarray:
    """Polygon (N, 2) of a class instance, roughly inside the unit disc, before stretch/rotation."""
    if cls == "ellipse":
        return _regular(48)
    if cls == "rectangle":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if cls == "triangle":
        pts = _regular(3, phase=-np.pi / 2)
        return pts + rng.uniform(-0.15, 0.15, size=pts.shape)
    if cls == "star":
        outer = _regular(5, 1.0, -np.pi / 2)
        inner = _regular(5, rng.uniform(0.38, 0.55), -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if cls == "cross":
        t = rng.uniform(0.26, 0.40)
        return np.array(
            [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t],
             [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]],
            dtype=np.float64,
        )  # fmt: skip
    if cls == "hexagon":
        return _regular(6)
    raise ValueError(f"unknown class {cls!r}")


def _polygon_mask(pts: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Boolean mask (h, w) of a polygon given in canvas pixels, for the window at (x0, y0)."""
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon([(float(x - x0), float(y - y0)) for x, y in pts], fill=255)
    return np.asarray(img) > 127


def _stroke_mask(pts, width: int, shape: tuple[int, int], closed: bool = False) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    xy = [(float(x), float(y)) for x, y in pts]
    if closed:
        xy = xy + xy[:1]
    ImageDraw.Draw(img).line(xy, fill=255, width=max(1, int(width)), joint="curve")
    return np.asarray(img) > 127


# ----------------------------------------------------------------------------------------------
# Colours and textures
# ----------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.1, 1.0))


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray, min_d: float) -> np.ndarray:
    """A random colour at least ``min_d`` (RGB Euclidean, [0,1] scale) from the mean colour
    ``under``."""
    best, best_d = None, -1.0
    for _ in range(20):
        c = _hsv_to_rgb(rng.random(), rng.uniform(0.25, 1.0), rng.uniform(0.25, 1.0))
        d = float(np.linalg.norm(c - under))
        if d >= min_d:
            return c
        if d > best_d:
            best, best_d = c, d
    # Nothing random contrasted enough: push the best one away from the background.
    return np.clip(best + (best - under) * 1.5 + np.where(under > 0.5, -0.3, 0.3), 0.0, 1.0)


def _linear_ramp(h: int, w: int, angle: float) -> np.ndarray:
    """(h, w) ramp from 0 to 1 along direction ``angle``."""
    xx = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(angle))
    yy = np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(angle))
    r = xx + yy
    r -= r.min()
    return r / max(float(r.max()), 1e-6)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3):
    """Low-frequency noise in [-1, 1]: a small random grid upsampled bicubically."""
    small = rng.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(small if channels == 3 else small[..., 0], mode)
    big = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return big if channels == 3 else big[..., None]


def _background(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    """Background (h, w, 3) at output resolution (it is smooth or axis-aligned enough that
    super-sampling it would change nothing after the final box filter)."""
    c0, c1 = _random_colour(rng), _random_colour(rng)
    ramp = _linear_ramp(h, w, rng.uniform(0, 2 * np.pi))[..., None]
    canvas = (c0 * (1 - ramp) + c1 * ramp).astype(np.float32)
    kinds = rng.choice(["stripes", "blobs", "checker", "speckle"], size=rng.integers(1, 3),
                       replace=False, p=[0.35, 0.35, 0.1, 0.2])  # fmt: skip
    for kind in kinds:
        if kind == "stripes":
            period = rng.uniform(4, 24)
            phase = _linear_ramp(h, w, rng.uniform(0, np.pi)) * (np.hypot(h, w) / period)
            wave = np.sin(2 * np.pi * phase)[..., None]
            if rng.random() < 0.4:
                wave = np.sign(wave)
            canvas += amp * rng.uniform(0.04, 0.16) * wave * (_random_colour(rng) - 0.5) * 2
        elif kind == "blobs":
            cells = int(rng.integers(3, 9))
            canvas += amp * rng.uniform(0.08, 0.25) * _smooth_noise(rng, h, w, cells)
        elif kind == "checker":
            cell = int(rng.uniform(6, 20))
            yy, xx = np.arange(h)[:, None] // cell, np.arange(w)[None, :] // cell
            board = ((yy + xx) % 2).astype(np.float32)[..., None] * 2 - 1
            canvas += amp * rng.uniform(0.03, 0.10) * board
        else:  # speckle: sparse salt and pepper dots, a few pixels wide
            cells = int(max(h, w) / 2.5)
            spots = _smooth_noise(rng, h, w, cells, channels=1)
            canvas += amp * rng.uniform(0.08, 0.2) * np.sign(spots) * (np.abs(spots) > 0.7)
    return np.clip(canvas, 0.0, 1.0)


def _paint(canvas: np.ndarray, mask: np.ndarray, y0: int, x0: int, colour, alpha: float = 1.0):
    region = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    m = mask[: region.shape[0], : region.shape[1]]
    region[m] = region[m] * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def _fill_texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray, s: int):
    """Texture (h, w, 3) for an object's fill: solid, gradient or stripes around ``colour``."""
    u = rng.random()
    if u < 0.75:
        return np.broadcast_to(colour.astype(np.float32), (h, w, 3))
    other = np.clip(colour + rng.uniform(-0.35, 0.35, size=3), 0.0, 1.0)
    ramp = _linear_ramp(h, w, rng.uniform(0, 2 * np.pi))[..., None]
    if u < 0.9:
        return (colour * (1 - ramp) + other * ramp).astype(np.float32)
    period = rng.uniform(3, 8) * s
    band = (np.sin(2 * np.pi * ramp * np.hypot(h, w) / period) > 0).astype(np.float32)
    return (colour * (1 - band) + other * band).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Clutter (not objects)
# ----------------------------------------------------------------------------------------------


def _clutter(rng: np.random.Generator, canvas: np.ndarray, s: int, n: int, thin: bool = False):
    h, w = canvas.shape[:2]
    for _ in range(n):
        kind = "line" if thin else rng.choice(["line", "curve", "scribble", "dots", "blob"])
        colour = _random_colour(rng)
        alpha = rng.uniform(0.3, 0.75)
        if kind == "blob":  # splat: many irregular spikes, unlike any class (a star has 5)
            r = rng.uniform(6, 14) * s
            k = 2 * int(rng.integers(8, 13))
            t = (np.arange(k) + rng.uniform(-0.3, 0.3, size=k)) * (2 * np.pi / k)
            spikes, dents = rng.uniform(0.6, 1.0, k), rng.uniform(0.2, 0.5, k)
            rad = r * np.where(np.arange(k) % 2 == 0, spikes, dents)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)
            mask = _polygon_mask(pts, 0, 0, w, h)
        elif kind == "dots":
            img = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(img)
            cx, cy, spread = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 30) * s
            for _ in range(int(rng.integers(5, 25))):
                x, y = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
                r = rng.uniform(0.5, 2.0) * s
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
            mask = np.asarray(img) > 127
        else:
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            if kind == "line":
                length, ang = rng.uniform(15, 150) * s, rng.uniform(0, 2 * np.pi)
                pts = [(x, y), (x + length * np.cos(ang), y + length * np.sin(ang))]
            elif kind == "curve":
                length, ang = rng.uniform(30, 150) * s, rng.uniform(0, 2 * np.pi)
                tt = np.linspace(0, 1, 24)
                amp, freq = rng.uniform(2, 10) * s, rng.uniform(1, 4)
                along, across = tt * length, amp * np.sin(2 * np.pi * freq * tt)
                px = x + along * np.cos(ang) - across * np.sin(ang)
                py = y + along * np.sin(ang) + across * np.cos(ang)
                pts = list(zip(px, py, strict=True))
            else:  # scribble
                steps = rng.normal(0, 8 * s, size=(int(rng.integers(4, 12)), 2))
                pts = [tuple(p) for p in np.array([x, y]) + np.cumsum(steps, axis=0)]
            width = (1 if thin else rng.integers(1, 4)) * s
            mask = _stroke_mask(pts, width, (h, w))
        _paint(canvas, mask, 0, 0, colour, alpha)


# ----------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    seq = np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index)])
    return np.random.default_rng(seq)


def render_image(config: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """Render image ``index`` of ``split``: (uint8 array (H, W, 3), list of annotations).

    Annotations hold ``category_id`` (1-based), ``bbox`` [x, y, w, h] (float, output pixels),
    ``area`` (= w * h) and ``mask`` (bool (H, W), the visible pixels at output resolution).
    """
    rng = _image_rng(config.seed, split, index)
    s = SUPERSAMPLE
    W = int(rng.integers(config.min_side, config.max_side + 1))
    H = int(rng.integers(config.min_side, config.max_side + 1))
    hs, ws = H * s, W * s
    canvas = _background(rng, H, W, config.texture).repeat(s, axis=0).repeat(s, axis=1)
    _clutter(rng, canvas, s, int(rng.integers(config.clutter[0], config.clutter[1] + 1)))

    # Plan the objects, largest first, so that small objects occlude big ones and not vice versa.
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    probs = np.array([config.p_small, config.p_medium, config.p_large], dtype=np.float64)
    buckets = list(rng.choice(3, size=n, p=probs / probs.sum()))
    large = [i for i, b in enumerate(buckets) if b == 2]
    for i in large[config.max_large_per_image :]:
        buckets[i] = 1
    ranges = (config.small_area, config.medium_area, config.large_area)
    plans = []
    for b in buckets:
        lo, hi = ranges[b]
        area = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        plans.append((area, int(rng.integers(NUM_SHAPES_CLASSES))))
    plans.sort(key=lambda p: -p[0])

    labels = np.zeros((hs, ws), dtype=np.int16)  # which object owns each super-sampled pixel
    full_px: list[int] = []  # pixel count of each placed object when it was drawn
    vis_px: list[int] = []  # pixel count of each placed object still visible now
    placed: list[int] = []  # class index of each placed object
    windows: list[tuple[int, int, int, int]] = []  # (x0, y0, x1, y1) of each placed object
    for target_area, cls_idx in plans:
        cls = SHAPES_CLASSES[cls_idx]
        pts = _unit_polygon(cls, rng)
        stretch = float(np.exp(rng.uniform(np.log(0.6), 0.0)))
        pts = pts * (np.array([stretch, 1.0]) if rng.random() < 0.5 else np.array([1.0, stretch]))
        ang = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        pts = pts @ rot.T
        ext = pts.max(axis=0) - pts.min(axis=0)
        k = np.sqrt(target_area / float(ext[0] * ext[1]))
        k = min(k, (W - 2) / ext[0], (H - 2) / ext[1])  # must fit in the image
        pts = (pts - pts.min(axis=0)) * k * s  # super-sampled pixels, bbox at the origin
        bw, bh = int(np.ceil(pts[:, 0].max())) + 1, int(np.ceil(pts[:, 1].max())) + 1
        mask = _polygon_mask(pts, 0, 0, bw, bh)
        npx = int(mask.sum())
        if npx == 0:
            continue
        obj_id = len(placed) + 1
        for _attempt in range(15):
            x0 = int(rng.integers(s, max(s + 1, ws - bw - s)))
            y0 = int(rng.integers(s, max(s + 1, hs - bh - s)))
            win = labels[y0 : y0 + bh, x0 : x0 + bw]
            m = mask[: win.shape[0], : win.shape[1]]
            covered = np.bincount(win[m].ravel(), minlength=obj_id)[1:obj_id]
            if not covered.any():
                break
            if np.all(np.array(vis_px) - covered >= config.min_visible * np.array(full_px)):
                break
        else:
            continue  # no placement keeps every object visible enough: drop this one
        for j in np.flatnonzero(covered):
            vis_px[j] -= int(covered[j])
        win[m] = obj_id
        region = canvas[y0 : y0 + bh, x0 : x0 + bw]
        under = region[m].mean(axis=0)
        colour = _contrasting_colour(rng, under, config.min_contrast)
        tex = _fill_texture(rng, bh, bw, colour, s)[: region.shape[0], : region.shape[1]]
        region[m] = tex[m]
        if rng.random() < 0.3:  # dark or light outline, kept inside the shape
            edge = _stroke_mask(pts, int(rng.integers(1, 3)) * s, (bh, bw), closed=True)
            edge = edge[: m.shape[0], : m.shape[1]] & m
            region[edge] = np.clip(colour * rng.uniform(0.2, 0.5) + rng.choice([0.0, 0.5]), 0, 1)
        full_px.append(int(m.sum()))
        vis_px.append(full_px[-1])
        windows.append((x0, y0, x0 + m.shape[1], y0 + m.shape[0]))
        placed.append(cls_idx)

    n_over = int(rng.integers(config.clutter_over[0], config.clutter_over[1] + 1))
    _clutter(rng, canvas, s, n_over, thin=True)

    # Down-sample (box filter), photometric jitter, noise, optional blur.
    img = sum(canvas[i::s, j::s] for i in range(s) for j in range(s)) * (1.0 / (s * s))
    img = (img - 0.5) * rng.uniform(0.8, 1.15) + 0.5 + rng.uniform(-0.08, 0.08)
    img = img + rng.normal(0.0, rng.uniform(*config.noise), size=img.shape)
    out = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if rng.random() < config.p_blur:
        blurred = Image.fromarray(out).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.8)))
        out = np.asarray(blurred)

    anns = []
    for j, cls_idx in enumerate(placed):
        # Occluders of object j lie inside its window; align the window to the output grid.
        wx0, wy0, wx1, wy1 = windows[j]
        wx0, wy0 = wx0 - wx0 % s, wy0 - wy0 % s
        wx1, wy1 = min(ws, -(-wx1 // s) * s), min(hs, -(-wy1 // s) * s)
        vis = labels[wy0:wy1, wx0:wx1] == j + 1
        ys, xs = np.nonzero(vis)
        x0, x1 = (wx0 + xs.min()) / s, (wx0 + xs.max() + 1) / s
        y0, y1 = (wy0 + ys.min()) / s, (wy0 + ys.max() + 1) / s
        mask = np.zeros((H, W), dtype=bool)
        cov = sum(vis[a::s, b::s].astype(np.float32) for a in range(s) for b in range(s))
        mask[wy0 // s : wy1 // s, wx0 // s : wx1 // s] = cov >= 0.5 * s * s
        anns.append(
            {
                "category_id": cls_idx + 1,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float((x1 - x0) * (y1 - y0)),
                "mask": mask,
            }
        )
    return out, anns


# ----------------------------------------------------------------------------------------------
# Whole dataset, atomically
# ----------------------------------------------------------------------------------------------


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_split(out_dir: Path, config: ShapesConfig, split: str) -> None:
    img_dir = out_dir / split
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(config.count(split)):
        pixels, anns = render_image(config, split, i)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(img_dir / name, compress_level=1)
        h, w = pixels.shape[:2]
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for a in anns:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "iscrowd": 0,
                    "segmentation": _rle(a["mask"]),
                }
            )
    coco = {
        "info": {
            "description": f"spp_triton synthetic shapes ({split})",
            "version": str(GENERATOR_VERSION),
            "fingerprint": config.fingerprint(),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(SHAPES_CLASSES)
        ],
    }
    (out_dir / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def generate_shapes_dataset(out_dir: str | os.PathLike, config: ShapesConfig | None = None) -> Path:
    """Generate the dataset into ``out_dir`` atomically and return ``out_dir``.

    Everything is written into a sibling temporary folder; ``meta.json`` (with the fingerprint)
    is written last and the folder is then renamed onto ``out_dir`` (a stale ``out_dir`` is moved
    aside first and deleted). An exception or a kill part-way leaves at most a hidden
    ``.<name>.tmp-*`` folder, never an ``out_dir`` that :func:`is_complete` accepts.
    Prefer :func:`ensure_shapes_dataset`, which also locks against concurrent generation.
    """
    out_dir = Path(out_dir)
    config = ShapesConfig() if config is None else config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    try:
        tmp.mkdir()
        for split in SPLITS:
            _write_split(tmp, config, split)
        meta = {
            "fingerprint": config.fingerprint(),
            "generator_version": GENERATOR_VERSION,
            "classes": list(SHAPES_CLASSES),
            "config": asdict(config),
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_shapes_dataset(
    root: str | os.PathLike | None = None, config: ShapesConfig | None = None
) -> Path:
    """Return the dataset folder under ``root``, generating it first if it is missing, incomplete
    or was made with another generator version / config. Safe to call from several processes."""
    config = ShapesConfig() if config is None else config
    out_dir = shapes_dataset_dir(root, config)
    if is_complete(out_dir, config):
        return out_dir
    with _lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_complete(out_dir, config):  # another process finished while we waited
            return out_dir
        # We hold the lock, so leftovers of killed generations of this folder are dead: remove.
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in out_dir.parent.glob(f".{out_dir.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return generate_shapes_dataset(out_dir, config)
