"""The procedural indoor-scene renderer behind the synthetic dataset: pure numpy, no torch.

Each scene is a room (floor, ceiling, side walls, back wall) holding 2-5 spheres and axis-aligned
boxes, seen by a pinhole camera with a little random pitch, yaw and roll. A vectorised numpy ray
caster takes the nearest hit per pixel, so every target comes from one geometry and they agree
with each other and with the image:

- ``depth``: z-depth in the camera frame, metres (rays are ``(x, y, 1)`` in the camera frame, so
  the ray parameter of a hit *is* its z-depth);
- ``normals``: unit surface normals in the camera frame (x right, y down, z forward), facing the
  camera;
- ``segmentation``: one of :data:`SYNTHETIC_CLASSES`; object classes are told apart by colour
  (warm vs cool hues) and shape (sphere vs box), room classes by orientation and texture;
- ``edges``: occlusion, contact, crease and class boundaries (both pixels of a pair are marked,
  so the map mirrors exactly under a horizontal flip);
- ``image``: Lambertian shading from a jittered point light near the ceiling (with shadows cast by
  the objects) plus a weak directional fill and ambient light, per-surface colours with random
  variation, procedural stripes / checker / noise textures in surface coordinates (a perspective
  cue), gamma and sensor noise. Shading ties brightness to normal and distance, which is what
  makes normals and depth learnable from RGB.

About 0.8% of pixels are sensor dropouts (small glare blobs): depth 0, normals 0, label -1, as in
real RGB-D data. Scene ``i`` of a stream depends only on ``(seed, stream, i)``, so subsets and
splits are stable whatever ``n`` is. The torch Dataset and DataModule over these scenes are in
:mod:`lightning_simo.data.synthetic`.
"""

from __future__ import annotations

import colorsys
import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FOCAL_PER_WIDTH",
    "NUM_CLASSES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_TASKS",
    "camera_intrinsics",
    "render_scene",
    "render_scenes",
    "scene_rng",
    "split_stream",
    "write_nyuv2_layout",
]

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "floor",
    "ceiling",
    "wall",
    "back_wall",
    "warm_sphere",
    "cool_sphere",
    "warm_box",
    "cool_box",
)
NUM_CLASSES = len(SYNTHETIC_CLASSES)
SYNTHETIC_TASKS: tuple[str, ...] = ("segmentation", "depth", "normals", "edges")

FOCAL_PER_WIDTH = 0.8
"""Focal length in pixels per pixel of image width (a 64 degree horizontal field of view)."""

_FLOOR, _CEILING, _LEFT, _RIGHT, _BACK = range(5)
_ROOM_CLASS = (0, 1, 2, 2, 3)  # surface id -> class for the five room planes
_EDGE_COS = float(np.cos(np.deg2rad(30.0)))  # normals turning more than this make an edge
_EPS = 1e-4


def camera_intrinsics(height: int, width: int) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` of the camera that renders ``height x width`` scenes.

    Pixel ``(u, v)`` (column, row) looks along ``((u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1)``;
    fixed intrinsics keep apparent size a depth cue.
    """
    focal = FOCAL_PER_WIDTH * width
    return focal, focal, width / 2.0, height / 2.0


def split_stream(split: str) -> int:
    """A stable random-stream id per split name, so splits of one seed never share a scene."""
    return zlib.crc32(split.encode("utf-8"))


# ----------------------------------------------------------------------------- geometry
def _rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation; positive ``pitch`` looks down (world y points down)."""
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    cr, sr = np.cos(roll), np.sin(roll)
    down = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # (0,0,1) -> (0, sin, cos)
    turn = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    tilt = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return turn @ down @ tilt


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of component-first vectors (``3 x P`` or ``3 x 1``)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _sphere_hit(
    origin: np.ndarray, direction: np.ndarray, center: np.ndarray, radius: float
) -> np.ndarray:
    """Ray parameter of the first hit of ``origin + t * direction`` (inf where missed).

    Vectors are component-first (``3 x P``; ``origin`` may be ``3 x 1``): reductions over a
    short last axis are what made a pixel-first caster slow.
    """
    oc = origin - center[:, None]
    a = _dot(direction, direction)
    b = 2.0 * _dot(direction, oc)
    c = _dot(oc, oc) - radius**2
    disc = b * b - 4.0 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    return np.where((disc > 0) & (t > _EPS), t, np.inf)


def _box_hit(
    origin: np.ndarray, direction: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slab test: (entry parameter, inf where missed; axis of the entry face)."""
    count = direction.shape[1]
    t_near = np.full(count, -np.inf)
    t_far = np.full(count, np.inf)
    axis = np.zeros(count, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            inv = 1.0 / direction[k]
            t1 = (lo[k] - origin[k]) * inv
            t2 = (hi[k] - origin[k]) * inv
            # fmin / fmax skip the NaN of a ray lying exactly in a slab plane
            near = np.fmin(t1, t2)
            better = near > t_near
            t_near = np.where(better, near, t_near)
            axis[better] = k
            t_far = np.fmin(t_far, np.fmax(t1, t2))
    hit = (t_near <= t_far) & (t_near > _EPS)
    return np.where(hit, t_near, np.inf), axis


@dataclass(frozen=True)
class _Object:
    shape: str  # "sphere" or "box"
    warm: bool
    color: np.ndarray
    center: np.ndarray  # sphere centre or box centre
    size: np.ndarray  # sphere: (r, r, r); box: half extents

    @property
    def label(self) -> int:
        return 4 + (0 if self.warm else 1) + (0 if self.shape == "sphere" else 2)

    def hit(self, origin: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ray parameter, axis of the entry face; meaningless for spheres)."""
        if self.shape == "sphere":
            t = _sphere_hit(origin, direction, self.center, float(self.size[0]))
            return t, np.zeros(t.shape, dtype=np.int64)
        return _box_hit(origin, direction, self.center - self.size, self.center + self.size)

    def normal(self, points: np.ndarray, direction: np.ndarray, axis: np.ndarray) -> np.ndarray:
        """Outward unit normals (``3 x P``) at ``points`` hit along ``direction``."""
        if self.shape == "sphere":
            return (points - self.center[:, None]) / self.size[0]
        n = np.zeros_like(points)
        cols = np.arange(points.shape[1])
        n[axis, cols] = -np.sign(direction[axis, cols])
        return n


@dataclass(frozen=True)
class _Room:
    cam_height: float  # floor is at y = cam_height (world y points down, camera at the origin)
    ceiling_y: float  # negative: above the camera
    left_x: float  # negative
    right_x: float
    back_z: float

    def hit(self, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearest ray parameter, surface id) over the five planes, seen from the inside."""
        dx, dy, dz = direction
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = np.stack(
                [
                    np.where(dy > 0, self.cam_height / dy, np.inf),
                    np.where(dy < 0, self.ceiling_y / dy, np.inf),
                    np.where(dx < 0, self.left_x / dx, np.inf),
                    np.where(dx > 0, self.right_x / dx, np.inf),
                    np.where(dz > 0, self.back_z / dz, np.inf),
                ]
            )
        surface = ts.argmin(axis=0)
        return np.take_along_axis(ts, surface[None], axis=0)[0], surface


_ROOM_NORMALS = np.array(
    [[0, -1, 0], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1]], dtype=np.float64
).T  # world-frame normals (3 x 5) of floor, ceiling, left, right, back, pointing into the room


# ----------------------------------------------------------------------------- appearance
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _room_colors(rng: np.random.Generator) -> np.ndarray:
    """Base colours of the five room planes: muted, so saturated objects stand out."""
    floor = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.1, 0.35), rng.uniform(0.35, 0.6))
    ceiling = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.08), rng.uniform(0.8, 0.95))
    wall = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.2), rng.uniform(0.6, 0.85))
    side = [wall * rng.uniform(0.95, 1.05, 3) for _ in range(2)]
    back = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.25), rng.uniform(0.55, 0.85))
    return np.clip(np.stack([floor, ceiling, *side, back]), 0.0, 1.0)


def _object_color(rng: np.random.Generator, warm: bool) -> np.ndarray:
    hue = rng.uniform(-0.03, 0.15) if warm else rng.uniform(0.45, 0.70)
    return _hsv(hue, rng.uniform(0.55, 0.9), rng.uniform(0.6, 0.95))


def _texture_fn(rng: np.random.Generator) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A random multiplicative texture ``f(u, v)`` (surface coordinates in metres) around 1."""
    pattern = rng.integers(3)
    amp = rng.uniform(0.06, 0.18)
    period = rng.uniform(0.3, 1.0)
    if pattern == 0:  # stripes, along u or v
        along_u = bool(rng.integers(2))

        def stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            w = u if along_u else v
            return 1.0 + amp * np.tanh(3.0 * np.sin(2 * np.pi * w / period))

        return stripes
    if pattern == 1:

        def checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            parity = (np.floor(u / period) + np.floor(v / period)) % 2
            return 1.0 + amp * (2.0 * parity - 1.0)

        return checker
    freqs = rng.uniform(0.8, 3.0, (3, 1)) * _unit2(rng.uniform(0, 2 * np.pi, 3))
    phases = rng.uniform(0, 2 * np.pi, 3)

    def noise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        waves = np.sin(2 * np.pi * (freqs[:, :1] * u + freqs[:, 1:] * v) + phases[:, None])
        return 1.0 + amp * 1.7 * waves.mean(axis=0)  # 1.7: mean of 3 sines has std ~0.41

    return noise


def _unit2(angles: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _surface_uv(surface: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = points
    if surface in (_FLOOR, _CEILING):
        return x, z
    if surface in (_LEFT, _RIGHT):
        return z, y
    return x, y


# ----------------------------------------------------------------------------- scene sampling
def _sample_room(rng: np.random.Generator) -> _Room:
    cam_height = rng.uniform(1.2, 1.7)
    width = rng.uniform(3.5, 6.0)
    left = width * rng.uniform(0.3, 0.7)
    return _Room(
        cam_height=cam_height,
        ceiling_y=cam_height - rng.uniform(2.5, 3.0),
        left_x=-left,
        right_x=width - left,
        back_z=rng.uniform(4.5, 8.0),
    )


def _sample_objects(rng: np.random.Generator, room: _Room) -> list[_Object]:
    objects = []
    for _ in range(rng.integers(2, 6)):
        warm = bool(rng.integers(2))
        color = _object_color(rng, warm)
        shape = "sphere" if rng.random() < 0.5 else "box"
        if shape == "sphere":
            size = np.full(3, rng.uniform(0.25, 0.7))
        else:
            size = np.array([rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.75), rng.uniform(0.2, 0.6)])
        x = rng.uniform(room.left_x + size[0], room.right_x - size[0])
        z = rng.uniform(1.8 + size[2], room.back_z - size[2])
        center = np.array([x, room.cam_height - size[1], z])  # resting on the floor
        objects.append(_Object(shape, warm, color, center, size))
    return objects


def _dropouts(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A mask of small disc-shaped sensor dropouts covering about 0.4-1% of the image."""
    target = rng.uniform(0.004, 0.010) * height * width
    grow = np.sqrt(height * width / (64 * 80))  # blob radius follows resolution
    rows, cols = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=bool)
    while mask.sum() < target:
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = max(0.8, rng.uniform(0.8, 2.0) * grow)  # >= 0.8 px always covers a pixel
        mask |= (rows + 0.5 - cy) ** 2 + (cols + 0.5 - cx) ** 2 <= radius**2
    return mask


def _edge_map(surface: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Mark both pixels of every 4-neighbour pair that lie on different surfaces or creases.

    A change of surface id is exactly an occlusion, contact or room-corner boundary (and every
    class boundary); a normal turning by more than 30 degrees adds the edges of box faces. Depth
    thresholds are avoided on purpose: on a grazing floor neighbouring depths differ a lot
    without any boundary.
    """
    edges = np.zeros(surface.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        ta, tb = tuple(a), tuple(b)
        cos = np.einsum("ijk,ijk->ij", normals[ta], normals[tb])
        change = (surface[ta] != surface[tb]) | (cos < _EDGE_COS)
        edges[ta] |= change
        edges[tb] |= change
    return edges


# ----------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=8)
def _camera_rays(height: int, width: int) -> np.ndarray:
    """Camera-frame ray directions ``(x, y, 1)`` of all pixels, ``3 x (H*W)``, row-major."""
    fx, fy, cx, cy = camera_intrinsics(height, width)
    rows, cols = np.mgrid[0:height, 0:width]
    rays = np.stack(
        [(cols.ravel() + 0.5 - cx) / fx, (rows.ravel() + 0.5 - cy) / fy, np.ones(rows.size)]
    )
    rays.flags.writeable = False
    return rays


def _nearest_hit(
    ray: np.ndarray, room: _Room, objects: Sequence[_Object]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ray parameter = z-depth, surface id, world-frame normal) of each ray's nearest hit: the
    room first, then each object where it is closer. Surface ids 0-4 are the room planes,
    ``5 + k`` object ``k``."""
    depth, surface = room.hit(ray)
    normal_w = _ROOM_NORMALS[:, surface]
    camera = np.zeros((3, 1))
    for k, obj in enumerate(objects):
        t, axis = obj.hit(camera, ray)
        closer = t < depth
        if closer.any():
            depth = np.where(closer, t, depth)
            surface = np.where(closer, 5 + k, surface)
            normal_w[:, closer] = obj.normal(
                t[closer] * ray[:, closer], ray[:, closer], axis[closer]
            )
    return depth, surface, normal_w


def _albedo(
    rng: np.random.Generator, surface: np.ndarray, points: np.ndarray, objects: Sequence[_Object]
) -> np.ndarray:
    """Per-point base colour (``3 x P``): textured room planes, plain objects."""
    albedo = np.empty_like(points)
    room_colors = _room_colors(rng)
    for s in range(5):
        on = surface == s
        texture = _texture_fn(rng)  # drawn for every plane so the stream does not depend on views
        if on.any():
            u, v = _surface_uv(s, points[:, on])
            albedo[:, on] = room_colors[s][:, None] * texture(u, v)
    for k, obj in enumerate(objects):
        albedo[:, surface == 5 + k] = obj.color[:, None]
    return albedo


def _radiance(
    rng: np.random.Generator,
    room: _Room,
    objects: Sequence[_Object],
    points: np.ndarray,
    normal_w: np.ndarray,
) -> np.ndarray:
    """Light reaching each point (``P``): a shadowed point light near the ceiling, a weak
    directional fill and ambient light."""
    light = np.array(
        [
            [rng.uniform(room.left_x + 0.5, room.right_x - 0.5)],
            [room.ceiling_y + rng.uniform(0.1, 0.4)],
            [rng.uniform(1.0, room.back_z - 1.0)],
        ]
    )
    to_light = light - points
    dist = np.sqrt(_dot(to_light, to_light))
    lambert = np.maximum(_dot(normal_w, to_light) / dist, 0.0)
    origin = points + 1e-3 * normal_w
    lit = np.ones(points.shape[1], dtype=bool)
    for obj in objects:  # shadow rays: blocked if an object lies between point and light
        t, _ = obj.hit(origin, to_light)
        lit &= t >= 1.0
    point_light = rng.uniform(4.0, 7.0) * lambert * lit / (1.0 + dist**2)
    fill_dir = np.array([rng.uniform(-0.5, 0.5), -1.0, -rng.uniform(0.2, 1.0)])
    fill_dir /= np.linalg.norm(fill_dir)
    fill = rng.uniform(0.1, 0.25) * np.maximum(fill_dir @ normal_w, 0.0)
    ambient = rng.uniform(0.15, 0.3)
    return ambient + fill + point_light


def _sensor(rng: np.random.Generator, radiance: np.ndarray, height: int, width: int) -> np.ndarray:
    """The camera's ``H x W x 3`` image of per-point radiance: clipping, gamma, noise."""
    image = np.clip(radiance, 0.0, 1.0) ** (1 / 2.2)
    image = image.T.reshape(height, width, 3)
    return image + rng.normal(0.0, rng.uniform(0.005, 0.02), image.shape)


def render_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """Render one random scene.

    Returns numpy arrays: ``image`` HxWx3 float32 in [0, 1], ``segmentation`` HxW int64 (-1 =
    dropout), ``depth`` HxW float32 metres (0 = dropout), ``normals`` HxWx3 float32 (camera
    frame, 0 = dropout), ``edges`` HxW float32 in {0, 1}.
    """
    if height < 2 or width < 2:
        raise ValueError(f"Scenes need at least 2x2 pixels, got {height}x{width}.")
    rot = _rotation(
        pitch=np.deg2rad(rng.uniform(0.0, 15.0)),
        yaw=np.deg2rad(rng.uniform(-12.0, 12.0)),
        roll=np.deg2rad(rng.uniform(-3.0, 3.0)),
    )
    ray = rot @ _camera_rays(height, width)  # world frame; the ray parameter stays z-depth
    room = _sample_room(rng)
    objects = _sample_objects(rng, room)
    depth, surface, normal_w = _nearest_hit(ray, room, objects)
    points = depth * ray
    labels = np.array([*_ROOM_CLASS, *(o.label for o in objects)])[surface]
    albedo = _albedo(rng, surface, points, objects)
    image = _sensor(rng, albedo * _radiance(rng, room, objects, points, normal_w), height, width)

    # targets in the camera frame; dropouts blank every target and glare the image
    normals = (rot.T @ normal_w).T.reshape(height, width, 3)
    edges = _edge_map(surface.reshape(height, width), normals)
    holes = _dropouts(rng, height, width)
    image[holes] = 0.25 * image[holes] + 0.75 * rng.uniform(0.9, 1.0)  # glare
    depth = depth.reshape(height, width)
    labels = labels.reshape(height, width)
    depth[holes] = 0.0
    normals[holes] = 0.0
    labels[holes] = -1
    return {
        "image": np.clip(image, 0.0, 1.0).astype(np.float32),
        "segmentation": labels.astype(np.int64),
        "depth": depth.astype(np.float32),
        "normals": normals.astype(np.float32),
        "edges": edges.astype(np.float32),
    }


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``(seed, stream)`` (scenes depend on nothing else)."""
    return np.random.default_rng([seed, stream, index])


def render_scenes(
    n: int, height: int = 64, width: int = 80, seed: int = 0, stream: int = 0
) -> dict[str, np.ndarray]:
    """Render scenes ``0 .. n-1`` of ``(seed, stream)``, stacked along a leading axis.

    Scene ``i`` depends only on ``(seed, stream, i)``: the first ``m`` scenes of ``n > m`` equal
    the ``m`` scenes of a smaller call.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    scenes = [render_scene(scene_rng(seed, stream, i), height, width) for i in range(n)]
    if not scenes:
        empty = render_scene(scene_rng(seed, stream, 0), height, width)
        return {k: v[None][:0] for k, v in empty.items()}
    return {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}


def write_nyuv2_layout(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    height: int = 64,
    width: int = 80,
    seed: int = 0,
) -> Path:
    """Write scenes as the MTAN NYUv2 files: ``root/<split>/{image,label,depth,normal}/<i>.npy``.

    ``image`` HxWx3 float32, ``label`` HxW float32 with -1 = ignore (MTAN stores labels as
    float), ``depth`` HxW float32 with 0 = invalid, ``normal`` HxWx3 float32 with 0 = invalid.
    ``splits`` defaults to NYUv2's sizes ``{"train": 795, "val": 654}``; each split uses the same
    random stream as :class:`SyntheticDataModule`, so ``val`` here equals its ``val`` split.
    Returns ``root``.
    """
    root = Path(root)
    splits = {"train": 795, "val": 654} if splits is None else dict(splits)
    for split, count in splits.items():
        for folder in _NYUV2_FOLDERS:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        stream = split_stream(split)
        for i in range(count):
            scene = render_scene(scene_rng(seed, stream, i), height, width)
            for folder, key in _NYUV2_FOLDERS.items():
                np.save(root / split / folder / f"{i}.npy", scene[key].astype(np.float32))
    return root


_NYUV2_FOLDERS = {"image": "image", "label": "segmentation", "depth": "depth", "normal": "normals"}
"""MTAN NYUv2 folder -> scene array it stores (all as float32, as MTAN stores labels)."""
