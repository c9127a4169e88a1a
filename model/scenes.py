"""A deterministic synthetic world: scenes, their pictures and captions, and an oracle for them.

A scene is one or two coloured shapes, each inside its own cell of a 3×3 grid, on a plain
background. Its caption states every attribute, so how faithful a generated image is to its
prompt can be scored by reading the image back (`read_scene`) and comparing (`compare`) — a
machine-checkable stand-in for the human ratings of PartiPrompts (Yu et al., 2022, §5). A few
(colour, shape) pairs never appear in training images: the compositional test split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Saturated and far apart in RGB, and far from every background, so blur, noise and the colour
# drift of a VQGAN round trip still leave each pixel nearest to its own palette entry.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (0, 170, 0),
    "blue": (20, 60, 230),
    "yellow": (240, 220, 0),
    "purple": (150, 30, 200),
    "orange": (255, 128, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
# Row-major over the 3×3 grid: a position's index is row * 3 + column.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
SIZES = {"small": 0.48, "large": 0.8}  # side of the shape's bounding box, in cell sides
SIZE_JITTER = 0.06  # relative; keeps the classes apart (0.51 < 0.64 < 0.75)
MAX_OBJECTS = 2

_STAR_INNER = 0.4  # inner/outer radius; a regular pentagram has 0.382, a little fatter reads better
_CROSS_ARM = 1 / 3  # arm half-width, in half-extents
_SUPERSAMPLE = 4  # samples per pixel side when drawing and when fitting templates
_MIN_AREA = 0.02  # fraction of a cell: smaller foreground blobs are noise, not objects
_EDGE = 0.08  # a blob centred this close (in cell sides) to its cell's edge is a neighbour's spill


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, its colour, its grid cell and its size class."""

    shape: str
    colour: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    """A background and its objects, kept in grid (reading) order so equality ignores order."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r}: use one of {', '.join(BACKGROUNDS)}")
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        if len({o.position for o in ordered}) != len(ordered):
            raise ValueError("two objects share a grid cell")
        object.__setattr__(self, "objects", ordered)

    def to_dict(self) -> dict[str, Any]:
        """`{"background": "white", "objects": [{"colour": ..., "position": ..., ...}]}`."""
        return {
            "background": self.background,
            "objects": [
                {"colour": o.colour, "position": o.position, "shape": o.shape, "size": o.size}
                for o in self.objects
            ],
        }

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> Scene:
        """Inverse of `to_dict`; extra keys (e.g. a metadata row's `text`) are ignored."""
        return cls(tree["background"], tuple(SceneObject(**o) for o in tree["objects"]))


def heldout_pairs() -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs kept out of train/validation: one per colour and one per shape."""
    # A shifted diagonal of the colour × shape table, so no pair is the "first" of both lists.
    return frozenset((c, SHAPES[(i + 2) % len(SHAPES)]) for i, c in enumerate(COLOURS))


@functools.cache
def _pairs() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(held-out, seen) (colour, shape) pairs, each in a fixed order so draws are reproducible."""
    held = heldout_pairs()
    return tuple(sorted(held)), tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in held)


def sample_scene(rng: np.random.Generator, *, heldout: bool) -> Scene:
    """A random scene; `heldout` ones have at least one held-out pair, the others none."""
    held, seen = _pairs()
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = []
    for k, cell in enumerate(cells):
        # Only the first object must be held out; a second may be either kind.
        pool = held if heldout and k == 0 else (held + seen if heldout else seen)
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        objects.append(SceneObject(shape, colour, POSITIONS[int(cell)], size))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(background, tuple(objects))


def _cell_bounds(length: int) -> list[tuple[int, int]]:
    """Pixel [start, stop) of the three cells along an axis: the pixels whose centres fall in it."""
    edges = [int(np.ceil(k * length / 3 - 0.5)) for k in range(4)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in box coordinates: u right, v down, the shape's bounding box is [-1, 1]²."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av) <= 1
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return box
    if shape == "diamond":
        return au + av <= 1
    if shape == "triangle":  # apex up, base along the bottom edge
        return box & (au <= (v + 1) / 2)
    if shape == "cross":
        return box & (np.minimum(au, av) <= _CROSS_ARM)
    if shape == "star":
        # Stretch the box onto a unit-radius, point-up star: x spans ±sin 72°, y spans -1..cos 36°.
        x = u * np.sin(np.radians(72))
        y = -1 + (v + 1) * (1 + np.cos(np.radians(36))) / 2
        rho, theta = np.hypot(x, y), np.degrees(np.arctan2(x, -y))
        # Fold into one tooth: psi = 0 at an inner vertex, 36° at a point.
        psi = np.radians(np.abs(np.mod(theta, 72) - 36))
        px, py = rho * np.cos(psi), rho * np.sin(psi)
        ox, oy = np.cos(np.radians(36)), np.sin(np.radians(36))
        # Inside when on the centre's side of the edge from inner vertex (r, 0) to the point (o).
        return (ox - _STAR_INNER) * py - oy * (px - _STAR_INNER) >= 0
    raise ValueError(f"shape={shape!r}: use one of {', '.join(SHAPES)}")


def _coverage(
    shape: str,
    rows: tuple[int, int],
    cols: tuple[int, int],
    centre: tuple[float, float],
    half: tuple[float, float],
) -> np.ndarray:
    """Fraction of each pixel in a patch that the shape covers, from 4×4 samples per pixel.

    Args:
        shape: a name from `SHAPES`.
        rows, cols: the patch, as pixel [start, stop) along y and x.
        centre: (x, y) of the shape's bounding box, in pixels.
        half: half its width and height, in pixels.

    Returns:
        (rows, cols) float array in [0, 1].
    """
    sub = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    x = (np.arange(*cols)[:, None] + sub).ravel()
    y = (np.arange(*rows)[:, None] + sub).ravel()
    inside = _shape_mask(
        shape, ((x - centre[0]) / half[0])[None, :], ((y - centre[1]) / half[1])[:, None]
    )
    h, w = rows[1] - rows[0], cols[1] - cols[0]
    return inside.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, *, image_size: int = 64, rng: np.random.Generator) -> Image.Image:
    """Draw a scene, edges anti-aliased; size and position jitter come from `rng`.

    Args:
        scene: what to draw.
        image_size: side in pixels; from 32 on, `read_scene` reads it back exactly.
        rng: the only source of randomness, so a seeded generator gives the same image.
    """
    canvas = np.empty((image_size, image_size, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    bounds, cell = _cell_bounds(image_size), image_size / 3
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        half = cell * SIZES[obj.size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER) / 2
        # A pixel of margin keeps each shape inside its cell even after a 3×3 blur.
        slack = max(cell / 2 - half - 1, 0.0)
        cx, cy = (np.array([col, row]) + 0.5) * cell + rng.uniform(-slack, slack, size=2)
        cover = _coverage(obj.shape, bounds[row], bounds[col], (cx, cy), (half, half))[..., None]
        patch = canvas[slice(*bounds[row]), slice(*bounds[col])]
        patch += cover * (np.array(COLOURS[obj.colour], np.float32) - patch)
    return Image.fromarray(np.rint(canvas).astype(np.uint8))


# Each template states every object's size, colour, shape and position, and the background.
_TEMPLATES = (
    "{objects}, on a {background} background",
    "a {background} background with {objects}",
    "a picture of {objects} on a {background} background",
    "{background} background; {listed}",
    "{count} on a {background} background: {objects}",
    "on a {background} background, {objects}",
)
_COUNTS = {1: "one shape", 2: "two shapes"}


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A caption in one of six phrasings, each naming every attribute of the scene.

    For example "a large red circle in the top left corner and a small blue star on the right,
    on a white background"; the phrasing is drawn from `rng`.
    """
    phrases = [
        f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}" for o in scene.objects
    ]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(
        objects=" and ".join(phrases),
        listed="; ".join(phrases),
        background=scene.background,
        count=_COUNTS.get(len(phrases), f"{len(phrases)} shapes"),
    )


NEAR_MISSES = ("background", "shape", "colour", "size", "position")  # what each miss changes


def near_misses(scene: Scene, rng: np.random.Generator) -> list[Scene]:
    """The scene with one attribute changed, once per attribute (`NEAR_MISSES`, in order):
    the background, and an object's shape, colour, size and cell. A scene without objects
    has only the first. Their captions are the hard negatives a scorer learns to tell
    apart from the true one (as in NegCLIP, Yuksekgonul et al. 2023). No change makes a
    held-out (colour, shape) pair, so the misses of training scenes never name one.
    """
    others = [b for b in BACKGROUNDS if b != scene.background]
    misses = [Scene(others[int(rng.integers(len(others)))], scene.objects)]
    if not scene.objects:
        return misses
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    taken, held = {o.position for o in scene.objects}, heldout_pairs()
    options = {
        "shape": [s for s in SHAPES if s != target.shape and (target.colour, s) not in held],
        "colour": [c for c in COLOURS if c != target.colour and (c, target.shape) not in held],
        "size": [z for z in SIZES if z != target.size],
        "position": [p for p in POSITIONS if p not in taken],
    }
    for name, values in options.items():
        changed = replace(target, **{name: values[int(rng.integers(len(values)))]})
        objects = tuple(changed if o is target else o for o in scene.objects)
        misses.append(Scene(scene.background, objects))
    return misses


def prompt_suite(count: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """`count` (caption, scene) pairs of the synthetic world, fixed by `seed`; every second
    scene has a held-out colour-shape pair."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        scene = sample_scene(rng, heldout=i % 2 == 1)
        pairs.append((describe(scene, rng), scene))
    return pairs


def read_scene(image: Image.Image | np.ndarray) -> Scene:
    """The attribute oracle: read a (possibly blurry or noisy) picture back into a scene.

    The background is the palette entry nearest the border's median; foreground is what lies
    far from it, cleaned by a 3×3 majority vote so speckle never counts as an object. A grid
    cell with enough foreground, centred away from its edges (a neighbour's spill hugs them),
    holds one object: its colour is the palette entry that best explains the median
    foreground colour, and its shape and size come from `_fit_shape`.

    Args:
        image: an RGB PIL image or an (H, W, 3) uint8 array, both sides at least 32 pixels.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 32:
        raise ValueError(f"expected an (H, W, 3) image with H, W >= 32, got {pixels.shape}")
    px = pixels.astype(np.float32)
    h, w = pixels.shape[:2]
    cell_side = min(h, w) / 3
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    # Measured, not the palette's: a colour cast moves background and objects together.
    bg = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda n: float(np.linalg.norm(bg - BACKGROUNDS[n])))
    nominal = np.array(BACKGROUNDS[background], np.float32)
    gap = min(np.linalg.norm(np.array(c, np.float32) - nominal) for c in COLOURS.values())
    # Foreground: further from the background than 40 % of its gap to the nearest object
    # colour, judged on a 3×3 mean (a third of the pixel noise) and then by majority vote.
    smooth = np.stack([_box3(px[..., k]) for k in range(3)], axis=-1)
    solid = _box3(np.linalg.norm(smooth - bg, axis=-1) > 0.4 * gap) >= 5 / 9
    distance = np.linalg.norm(px - bg, axis=-1)
    rows, cols = _cell_bounds(h), _cell_bounds(w)
    objects = []
    for index, position in enumerate(POSITIONS):
        r, c = divmod(index, 3)
        cell = (slice(*rows[r]), slice(*cols[c]))
        blob = solid[cell]
        if blob.sum() < _MIN_AREA * cell_side**2:
            continue
        # The most object-like half of the blob: blurred rims would dim the median.
        core = px[cell][blob & (distance[cell] >= np.median(distance[cell][blob]))]
        colour = _nearest_mix(np.median(core, axis=0), bg)
        # How far each pixel lies along background → object colour (0 → 1).
        direction = np.array(COLOURS[colour], np.float32) - bg
        coverage = (px[cell] - bg) @ direction / float(direction @ direction)
        # Pixels not touching the blob are speckle, not object.
        shape, half, (cx, cy) = _fit_shape(coverage, support=_box3(blob) > 0)
        if min(cx, cy, blob.shape[1] - cx, blob.shape[0] - cy) < _EDGE * cell_side:
            continue
        size = "large" if 2 * half / cell_side > sum(SIZES.values()) / 2 else "small"
        objects.append(SceneObject(shape, colour, position, size))
    return Scene(background, tuple(objects))


def _nearest_mix(colour: np.ndarray, bg: np.ndarray) -> str:
    """The object colour c that best explains `colour` as a mix of c and the background.

    Blur and anti-aliasing blend an object into the background, so a dim orange on black lies
    near the line from black to orange even where, as a point, it is nearer to red.
    """
    residuals = []
    for rgb in COLOURS.values():
        direction = np.array(rgb, np.float32) - bg
        alpha = np.clip((colour - bg) @ direction / (direction @ direction), 0.0, 1.0)
        residuals.append(float(np.linalg.norm(colour - bg - alpha * direction)))
    return list(COLOURS)[int(np.argmin(residuals))]


def _box3(values: np.ndarray) -> np.ndarray:
    """3×3 box mean, edges repeated outside; (h, w) → (h, w) float."""
    padded = np.pad(values.astype(np.float32), 1, mode="edge")
    h, w = values.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9


@functools.cache
def _shape_stats(shape: str) -> tuple[float, float]:
    """(area, centroid's v) of a shape in its [-1, 1]² box, from a fine grid of samples."""
    grid = (np.arange(512) + 0.5) / 256 - 1
    inside = _shape_mask(shape, grid[None, :], grid[:, None])
    return 4 * float(inside.mean()), float(grid @ inside.sum(axis=1) / inside.sum())


def _fit_shape(coverage: np.ndarray, support: np.ndarray) -> tuple[str, float, tuple[float, float]]:
    """The shape that best explains a cell's coverage, its half-extent and its centroid (x, y).

    Blur keeps an object's total coverage and its centroid but eats thin tips, so bounding
    boxes shrink. Instead each shape's box is placed from those two invariants (given the
    shape's known area and centroid within its box) and its template scored against the
    coverage by soft IoU, sum(min) / sum(max), both sharp and 3×3-blurred.

    Args:
        coverage: (h, w) cell, 0 = background and 1 = object colour, unclipped.
        support: (h, w) bool, where the object may be.
    """
    ys, xs = np.nonzero(support)
    rows, cols = (int(ys.min()), int(ys.max()) + 1), (int(xs.min()), int(xs.max()) + 1)
    region = (slice(*rows), slice(*cols))
    weights = np.where(support[region], coverage[region], 0)
    seen = np.clip(weights, 0, 1)
    mass = max(float(weights.sum()), 1e-6)
    grid_y, grid_x = np.mgrid[slice(*rows), slice(*cols)] + 0.5
    cx, cy = float((weights * grid_x).sum() / mass), float((weights * grid_y).sum() / mass)
    best = ("", 0.0, -1.0)
    for shape in SHAPES:
        area, centroid_v = _shape_stats(shape)
        half = float(np.sqrt(mass / area))
        sharp = _coverage(shape, rows, cols, (cx, cy - centroid_v * half), (half, half))
        score = max(
            np.minimum(seen, t).sum() / max(float(np.maximum(seen, t).sum()), 1e-6)
            for t in (sharp, _box3(sharp))
        )
        if score > best[2]:
            best = (shape, half, score)
    return best[0], best[1], (cx, cy)


def compare(predicted: Scene, truth: Scene) -> dict[str, bool]:
    """Which attributes of `predicted` match `truth`.

    Each object attribute compares the multiset of its values over the objects, so one wrong
    shape fails "shape" without failing "colour"; "binding" compares the (colour, shape) pairs,
    the held-out split's question; "exact" needs the whole scene to match.
    """

    def values(scene: Scene, *names: str) -> list[tuple[str, ...]]:
        return sorted(tuple(getattr(o, n) for n in names) for o in scene.objects)

    result = {"background": predicted.background == truth.background}
    result["count"] = len(predicted.objects) == len(truth.objects)
    for name in ("shape", "colour", "position", "size"):
        result[name] = values(predicted, name) == values(truth, name)
    result["binding"] = values(predicted, "colour", "shape") == values(truth, "colour", "shape")
    result["exact"] = predicted == truth
    return result
