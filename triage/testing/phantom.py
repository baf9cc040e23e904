"""Synthetic radiograph phantoms: projected anatomy, findings, detector effects.

Anatomy is modelled in millimetres as a list of primitives (hollow bones with a cortex and a
medulla, ellipsoidal carpals and condyles, soft-tissue envelopes), projected for the view (a
rotation about the limb's long axis), then placed on the pixel grid by a random similarity
transform. Each primitive is rasterised analytically inside its own bounding box, so a 2500 × 2000
image costs a few hundred milliseconds and the cost scales with the anatomy in view, not with the
number of bones in the model.

Pixel values are attenuation as displayed in MONOCHROME2: air dark, soft tissue grey, bone bright,
metal saturated. Abnormal phantoms carry one or two findings (fracture, hardware, lytic lesion,
dislocation) sized relative to the bone they affect, so they survive downscaling to 64–128 px.
The random stream is split into anatomy, findings and detector parts: the same generator state
gives the same anatomy and noise whether the phantom is normal or abnormal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from triage.study_types import StudyType

#: Body parts outside MURA that the renderer also draws (the daemon must skip them).
OTHER_BODY_PARTS: tuple[str, ...] = ("CHEST", "KNEE")
#: Views the renderer understands (after normalisation by :func:`normalise_view`).
VIEWS: tuple[str, ...] = ("AP", "PA", "LAT", "OBL")
#: Kinds of finding an abnormal phantom may carry.
FINDING_KINDS: tuple[str, ...] = ("fracture", "hardware", "lesion", "dislocation")

_VIEW_ALIASES = {
    "AP": "AP",
    "PA": "PA",
    "LAT": "LAT",
    "LATERAL": "LAT",
    "LL": "LAT",
    "RL": "LAT",
    "Y": "LAT",
    "OBL": "OBL",
    "OBLIQUE": "OBL",
    "LLO": "OBL",
    "RLO": "OBL",
}

# Linear attenuation per millimetre. Only the ratios matter: each image is normalised like a
# CR/DX reader's processing would do, and metal is far above bone so it saturates.
_MU_SOFT = 0.020
_MU_CORTEX = 0.110
_MU_MEDULLA = 0.034
_MU_METAL = 1.0


def parse_body_part(value: StudyType | str) -> StudyType | str:
    """A :class:`StudyType` for a MURA type name ("WRIST", "XR_WRIST"), or "CHEST"/"KNEE"."""
    if isinstance(value, StudyType):
        return value
    text = str(value).strip().upper().replace(" ", "_")
    if text in OTHER_BODY_PARTS:
        return text
    for member in StudyType:
        if text in (member.value, member.name):
            return member
    raise ValueError(f"unknown body part {value!r}: use a StudyType name or one of CHEST, KNEE")


def normalise_view(view: str) -> str:
    """The renderer's view name for *view* ("LATERAL" → "LAT", "RLO" → "OBL")."""
    try:
        return _VIEW_ALIASES[view.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}") from None


@dataclass(frozen=True)
class Finding:
    """Where a rendered abnormality is: pixel centre (row, col), extent radius in pixels."""

    kind: str
    detail: str
    bone: str
    row: float
    col: float
    radius: float


# --------------------------------------------------------------------------------------------
# Primitives. Geometry is 2-D (already projected); the same classes serve in millimetres and,
# after `_Affine`, in pixels.


@dataclass(frozen=True)
class _Affine:
    """p' = m @ p + offset, with m a scaled orthogonal matrix (rotation, mirror, zoom)."""

    m: np.ndarray
    offset: np.ndarray

    @property
    def scale(self) -> float:
        return float(math.sqrt(abs(np.linalg.det(self.m))))

    def point(self, p: np.ndarray) -> np.ndarray:
        return self.m @ p + self.offset

    def direction(self, v: np.ndarray) -> np.ndarray:
        return (self.m @ v) / self.scale

    @staticmethod
    def rigid(angle: float, pivot: np.ndarray, shift: np.ndarray) -> _Affine:
        c, s = math.cos(angle), math.sin(angle)
        m = np.array([[c, -s], [s, c]])
        return _Affine(m, pivot - m @ pivot + shift)


_Clip = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class _Tube:
    """A long bone (or a limb's soft tissue, or a wire): a capsule whose ends may flare.

    Projected thickness of a hollow cylinder: the cortex shows as bright margins, the medulla
    darker. ``clips`` are half-planes (point, normal) the tube is cut to — fracture fragments.
    """

    p0: np.ndarray
    p1: np.ndarray
    r: float
    cortex: float = 0.33
    flare0: float = 0.0
    flare1: float = 0.0
    mu_c: float = _MU_CORTEX
    mu_m: float = _MU_MEDULLA
    clips: tuple[_Clip, ...] = ()
    name: str = ""
    fracturable: bool = False

    def transformed(self, tf: _Affine) -> _Tube:
        return replace(
            self,
            p0=tf.point(self.p0),
            p1=tf.point(self.p1),
            r=self.r * tf.scale,
            clips=tuple((tf.point(p), tf.direction(n)) for p, n in self.clips),
        )

    def at(self, t: float) -> np.ndarray:
        return self.p0 + t * (self.p1 - self.p0)

    def radius_at(self, t: float) -> float:
        w0, w1 = _flare_weights(np.float32(t))
        return float(self.r * (1 + self.flare0 * w0 + self.flare1 * w1))

    @property
    def length(self) -> float:
        return float(np.hypot(*(self.p1 - self.p0)))

    @property
    def axis(self) -> np.ndarray:
        d = self.p1 - self.p0
        return d / max(float(np.hypot(*d)), 1e-9)


@dataclass(frozen=True)
class _Blob:
    """An ellipsoid (carpal, condyle, humeral head, organ), optionally hollow."""

    c: np.ndarray
    a: float
    b: float
    depth: float
    angle: float = 0.0
    cortex: float = 0.25
    mu_c: float = _MU_CORTEX
    mu_m: float = _MU_MEDULLA
    name: str = ""

    def transformed(self, tf: _Affine) -> _Blob:
        u = tf.direction(np.array([math.cos(self.angle), math.sin(self.angle)]))
        s = tf.scale
        return replace(
            self,
            c=tf.point(self.c),
            a=self.a * s,
            b=self.b * s,
            depth=self.depth * s,
            angle=math.atan2(u[1], u[0]),
        )


@dataclass(frozen=True)
class _Box:
    """A metal bar of constant thickness (plate, screw shaft, screw head); optional threads."""

    c: np.ndarray
    half_len: float
    half_wid: float
    angle: float
    value: float
    pitch: float = 0.0

    def transformed(self, tf: _Affine) -> _Box:
        u = tf.direction(np.array([math.cos(self.angle), math.sin(self.angle)]))
        s = tf.scale
        return replace(
            self,
            c=tf.point(self.c),
            half_len=self.half_len * s,
            half_wid=self.half_wid * s,
            angle=math.atan2(u[1], u[0]),
            pitch=self.pitch * s,
        )


@dataclass(frozen=True)
class _Hole:
    """A multiplicative loss of bone inside an ellipse (lytic lesion)."""

    c: np.ndarray
    a: float
    b: float
    angle: float
    strength: float


_Prim = _Tube | _Blob


@dataclass(frozen=True)
class _Joint:
    name: str
    center: np.ndarray
    size: float
    distal: tuple[int, ...]


@dataclass
class _Scene:
    """Anatomy in millimetres (then pixels): soft tissue, bones, joints, and findings' layers."""

    envelope: list[_Prim] = field(default_factory=list)  # soft tissue, union by maximum
    organs: list[_Prim] = field(default_factory=list)  # soft tissue added on top
    air: list[_Prim] = field(default_factory=list)  # lungs, subtracted
    bones: list[_Prim] = field(default_factory=list)
    joints: list[_Joint] = field(default_factory=list)
    metal: list[_Tube | _Blob | _Box] = field(default_factory=list)
    holes: list[_Hole] = field(default_factory=list)

    def transformed(self, tf: _Affine) -> _Scene:
        s = tf.scale
        return _Scene(
            envelope=[p.transformed(tf) for p in self.envelope],
            organs=[p.transformed(tf) for p in self.organs],
            air=[p.transformed(tf) for p in self.air],
            bones=[p.transformed(tf) for p in self.bones],
            joints=[_Joint(j.name, tf.point(j.center), j.size * s, j.distal) for j in self.joints],
            metal=[p.transformed(tf) for p in self.metal],
            holes=[_Hole(tf.point(h.c), h.a * s, h.b * s, h.angle, h.strength) for h in self.holes],
        )


def _flare_weights(u: Any) -> tuple[Any, Any]:
    """Weights of the two flared ends along the normalised axis position *u* (0..1)."""
    w0 = np.clip(1.0 - u / 0.22, 0.0, 1.0) ** 2
    w1 = np.clip((u - 0.78) / 0.22, 0.0, 1.0) ** 2
    return w0, w1


# --------------------------------------------------------------------------------------------
# Scene building in millimetres: 3-D points projected for a rotation `alpha` about the long axis.


class _Builder:
    def __init__(self, rng: np.random.Generator, alpha_deg: float) -> None:
        self.rng = rng
        self.ca = math.cos(math.radians(alpha_deg))
        self.sa = math.sin(math.radians(alpha_deg))
        self.scene = _Scene()
        self.flex: tuple[float, float] | None = None  # (angle rad, pivot y) for the humerus group
        self.soft_scale = float(rng.uniform(0.85, 1.3))

    def _p3(self, p: Sequence[float]) -> np.ndarray:
        x, y, z = (float(v) for v in (*p, 0.0)[:3])
        if self.flex is not None:
            angle, pivot = self.flex
            dy, dz = y - pivot, z
            y = pivot + dy * math.cos(angle) - dz * math.sin(angle)
            z = dy * math.sin(angle) + dz * math.cos(angle)
        return np.array([x * self.ca + z * self.sa, y])

    def bone(
        self,
        p0: Sequence[float],
        p1: Sequence[float],
        r: float,
        *,
        flare: tuple[float, float] = (0.0, 0.0),
        cortex: float = 0.33,
        density: float = 1.0,
        name: str = "",
        fracturable: bool = True,
        flat0: bool = False,
    ) -> int:
        a = self._p3(p0) + self.rng.normal(0.0, 0.6, 2)
        b = self._p3(p1) + self.rng.normal(0.0, 0.6, 2)
        radius = r * float(self.rng.uniform(0.93, 1.07))
        # A flat articular end (distal radius, tibial plateau) instead of a rounded cap.
        clips = ((a, _unit(b - a)),) if flat0 else ()
        self.scene.bones.append(
            _Tube(
                a,
                b,
                radius,
                cortex=cortex,
                flare0=flare[0],
                flare1=flare[1],
                mu_c=_MU_CORTEX * density,
                mu_m=_MU_MEDULLA * density,
                clips=clips,
                name=name,
                fracturable=fracturable,
            )
        )
        return len(self.scene.bones) - 1

    def blob(
        self,
        c: Sequence[float],
        a: float,
        b: float,
        *,
        depth: float | None = None,
        angle_deg: float = 0.0,
        cortex: float = 0.25,
        density: float = 1.0,
        name: str = "",
    ) -> int:
        d = depth if depth is not None else (a + b) / 2
        a_proj = math.hypot(a * self.ca, d * self.sa)
        d_proj = a * d / max(a_proj, 1e-9)
        j = float(self.rng.uniform(0.93, 1.07))
        self.scene.bones.append(
            _Blob(
                self._p3(c) + self.rng.normal(0.0, 0.4, 2),
                a_proj * j,
                b * j,
                d_proj * j,
                angle=math.radians(angle_deg),
                cortex=cortex,
                mu_c=_MU_CORTEX * density,
                mu_m=_MU_MEDULLA * density,
                name=name,
            )
        )
        return len(self.scene.bones) - 1

    def soft(
        self, p0: Sequence[float], p1: Sequence[float], rx: float, rz: float | None = None
    ) -> None:
        rz = rx if rz is None else rz
        rx, rz = rx * self.soft_scale, rz * self.soft_scale
        a, b = self._p3(p0), self._p3(p1)
        r = math.hypot(rx * self.ca, rz * self.sa)
        depth = rx * rz / r
        self.scene.envelope.append(
            _Tube(a, b, r, cortex=1.0, mu_c=_MU_SOFT * depth / r, mu_m=0.0, name="soft")
        )

    def soft_blob(
        self, c: Sequence[float], a: float, b: float, depth: float, *, organ: bool = False
    ) -> None:
        a_proj = math.hypot(a * self.ca, depth * self.sa)
        d_proj = a * depth / a_proj
        blob = _Blob(self._p3(c), a_proj, b, d_proj, cortex=1.0, mu_c=_MU_SOFT, mu_m=0.0)
        (self.scene.organs if organ else self.scene.envelope).append(blob)

    def air(self, c: Sequence[float], a: float, b: float, depth: float) -> None:
        self.scene.air.append(
            _Blob(self._p3(c), a, b, depth, cortex=1.0, mu_c=_MU_SOFT * 0.9, mu_m=0.0)
        )

    def joint(self, name: str, center: Sequence[float], size: float, distal: Iterable[int]) -> None:
        self.scene.joints.append(_Joint(name, self._p3(center), size, tuple(distal)))


@dataclass(frozen=True)
class _Layout:
    """Where the image looks: scene point at its centre, short side in mm, base rotation."""

    center: np.ndarray
    fov: float
    rotation_deg: float


def _unit(v: np.ndarray) -> np.ndarray:
    return v / float(np.hypot(*v))


def _finger_mark(b: _Builder, start: Sequence[float], tip: Sequence[float]) -> dict[str, Any]:
    """A finger's projected axis, for framing finger studies in any view."""
    a, z = b._p3(start), b._p3(tip)
    return {"start": a, "tip": z, "dir": _unit(z - a)}


def _limb_scene(
    rng: np.random.Generator, alpha: float, flex_deg: float, with_thorax: bool
) -> tuple[_Scene, dict[str, Any]]:
    """The whole upper limb, fingers up (−y), radius/thumb side −x, volar +z; wrist at y = 0.

    Returns the scene and landmarks (finger axes, elbow, shoulder) for framing.
    """
    b = _Builder(rng, alpha)
    marks: dict[str, Any] = {}
    hand: list[int] = []
    # Forearm and wrist.
    radius = b.bone((-12, 3, 0), (-15, 245, 2), 7.5, flare=(1.0, 0.45), name="radius", flat0=True)
    ulna = b.bone((12, 12, -6), (6, 253, -6), 6.3, flare=(0.3, 0.95), name="ulna")
    forearm = [radius, ulna, b.blob((17, 8, -6), 2.5, 4.0, name="ulnar styloid")]
    carpals = [
        b.blob((-13, -8, 3), 7.0, 5.0, angle_deg=30, name="scaphoid"),
        b.blob((-1, -9, 0), 6.0, 5.5, name="lunate"),
        b.blob((10, -6, -2), 5.5, 5.0, name="triquetrum"),
        b.blob((13, -2, 8), 4.0, 4.0, name="pisiform"),
        b.blob((-21, -22, 4), 6.0, 6.0, name="trapezium"),
        b.blob((-11, -26, 2), 5.0, 5.0, name="trapezoid"),
        b.blob((-1, -25, 0), 6.0, 8.0, name="capitate"),
        b.blob((11, -23, -2), 6.5, 7.0, name="hamate"),
    ]
    hand += carpals
    # Metacarpals and fingers: (base, head, z, phalanx lengths, fan angle).
    digits = [
        ((-12, -35), (-20, -95), 6.0, (40, 23, 17), -3.0),
        ((-1, -35), (-3, -98), 2.0, (44, 27, 18), 0.0),
        ((10, -34), (13, -92), -2.0, (41, 26, 18), 3.0),
        ((19, -31), (27, -84), -6.0, (33, 19, 16), 7.0),
    ]
    fingers: list[dict[str, Any]] = []
    for index, (base, head, z, lengths, fan) in enumerate(digits, start=2):
        mc = b.bone((*base, z), (*head, z), 4.2, flare=(0.45, 0.6), name=f"metacarpal {index}")
        direction = _unit(np.subtract(head, base))
        c, s = math.cos(math.radians(fan)), math.sin(math.radians(fan))
        direction = np.array(
            [c * direction[0] - s * direction[1], s * direction[0] + c * direction[1]]
        )
        start = np.asarray(head, float) + direction * 3.8
        bones = []
        radii = (4.4, 3.7, 3.0)
        flares = ((0.5, 0.4), (0.4, 0.35), (0.35, 0.55))
        joints = []
        for k, (length, r, fl) in enumerate(zip(lengths, radii, flares, strict=True)):
            end = start + direction * length
            bones.append(
                b.bone((*start, z), (*end, z), r, flare=fl, name=f"phalanx {index}.{k + 1}")
            )
            joints.append(start - direction * 1.8)
            start = end + direction * 3.0
        tip = start
        b.soft((*(np.asarray(head) - direction * 4), z), (*tip, z), 8.5, 8.0)
        b.joint(f"MCP {index}", (*joints[0], z), 5.0, bones)
        b.joint(f"PIP {index}", (*joints[1], z), 4.0, bones[1:])
        b.joint(f"DIP {index}", (*joints[2], z), 3.5, bones[2:])
        hand += [mc, *bones]
        fingers.append(_finger_mark(b, (*head, z), (*tip, z)))
    # Thumb.
    mc1 = b.bone((-23, -27, 14), (-42, -62, 20), 4.6, flare=(0.4, 0.5), name="metacarpal 1")
    t1 = b.bone((-44, -66, 22), (-56, -92, 24), 4.2, flare=(0.4, 0.4), name="phalanx 1.1")
    t2 = b.bone((-57, -95, 24), (-63, -112, 25), 3.6, flare=(0.35, 0.55), name="phalanx 1.2")
    b.soft((-24, -25, 14), (-63, -113, 25), 10.0, 9.0)
    b.joint("MCP 1", (-43, -64, 21), 4.5, (t1, t2))
    b.joint("IP 1", (-56, -93, 24), 3.8, (t2,))
    hand += [mc1, t1, t2]
    fingers.insert(0, _finger_mark(b, (-42, -62, 20), (-64, -115, 25)))
    marks["fingers"] = fingers
    b.joint("wrist", (0, -1, 0), 14.0, hand)
    # Soft tissue of hand, wrist and forearm.
    b.soft((-2, -12, 0), (3, -82, 0), 40.0, 14.0)
    b.soft((-18, -20, 8), (-40, -62, 14), 14.0)
    b.soft((0, -10, 0), (0, 150, 0), 31.0, 23.0)
    b.soft((0, 120, 0), (0, 270, 0), 40.0, 36.0)
    # Elbow and humerus: the group flexion rotates (lateral elbow views).
    b.flex = (math.radians(flex_deg), 255.0)
    upper = [
        b.bone((0, 262, 0), (-3, 560, 0), 10.5, flare=(1.35, 0.6), name="humerus"),
        b.blob((-14, 258, 2), 9.0, 8.0, name="capitellum"),
        b.blob((9, 260, 0), 11.0, 8.0, name="trochlea"),
        b.blob((26, 272, -2), 6.0, 6.0, name="medial epicondyle"),
        b.blob((-24, 270, 0), 4.0, 5.0, name="lateral epicondyle"),
    ]
    head = b.blob((8, 572, -4), 24.0, 25.0, cortex=0.1, name="humeral head")
    upper += [head, b.blob((-14, 562, 4), 10.0, 13.0, cortex=0.15, name="greater tuberosity")]
    b.soft((0, 250, 0), (0, 560, 0), 44.0, 42.0)
    b.flex = None
    olecranon = b.blob((4, 268, -14), 10.0, 12.0, name="olecranon")
    forearm.append(olecranon)
    b.joint("elbow", (0, 256, 0), 14.0, forearm + hand)
    [  # shoulder girdle
        b.blob((42, 572, -8), 7.0, 20.0, density=1.2, name="glenoid"),
        b.blob(
            (75, 520, -25),
            42.0,
            78.0,
            depth=4.0,
            angle_deg=-15,
            cortex=1.0,
            density=0.5,
            name="scapula",
        ),
        b.bone((48, 590, -20), (70, 450, -25), 4.0, density=0.8, name="scapular border"),
        b.bone((62, 610, -10), (-12, 602, 0), 7.0, flare=(0.0, 0.4), name="acromion"),
        b.bone((210, 628, 10), (64, 614, 0), 8.0, flare=(0.3, 0.5), name="clavicle"),
        b.blob((40, 598, 20), 6.0, 9.0, name="coracoid"),
    ]
    b.joint("shoulder", (20, 572, 0), 22.0, upper + forearm + hand)
    b.soft_blob((20, 585, 0), 72.0, 64.0, 70.0)
    if with_thorax:
        for i in range(6):
            y = 560 + i * 34
            pts = [(72, y - 20, -40), (150, y, -30), (230, y + 38, 0), (300, y + 95, 30)]
            for p, q in itertools.pairwise(pts):
                # Background anatomy: findings go on the shoulder's own bones.
                b.bone(p, q, 4.5, cortex=0.4, density=0.75, name=f"rib {i + 2}", fracturable=False)
        b.soft_blob((220, 680, 0), 170.0, 220.0, 110.0)
        b.air((230, 690, 0), 110.0, 170.0, 70.0)
    marks["elbow"] = np.array([0.0, 256.0])
    marks["shoulder"] = b._p3((20, 572, 0))
    return b.scene, marks


def _limb_pose(part: StudyType, view: str, rng: np.random.Generator) -> tuple[float, float]:
    """(rotation about the long axis, elbow flexion) in degrees for a limb study type and view."""
    alpha = {"AP": 0.0, "PA": 0.0, "OBL": 45.0, "LAT": 90.0}[view]
    alpha += float(rng.normal(0, 4))
    if view == "OBL" and rng.random() < 0.3:
        alpha = -alpha
    flex = 0.0
    if part is StudyType.ELBOW and view == "LAT":
        flex = float(rng.uniform(80, 100))
    return alpha, flex


def _frame_limb(
    part: StudyType, view: str, marks: dict[str, Any], aspect: float, rng: np.random.Generator
) -> _Layout:
    if part is StudyType.FINGER:
        finger = marks["fingers"][int(rng.choice(5, p=[0.15, 0.3, 0.25, 0.15, 0.15]))]
        center = (finger["start"] + finger["tip"]) / 2
        rotation = -math.degrees(math.atan2(finger["dir"][0], -finger["dir"][1]))
        return _Layout(center, 72.0, rotation)
    if part is StudyType.HAND:
        return _Layout(np.array([-8.0, -48.0]), 180.0, 0.0)
    if part is StudyType.WRIST:
        return _Layout(np.array([-2.0, -6.0]), 100.0, 0.0)
    if part is StudyType.FOREARM:
        return _Layout(np.array([0.0, 128.0]), max(100.0, 320.0 / aspect), 0.0)
    if part is StudyType.ELBOW:
        if view == "LAT":
            return _Layout(marks["elbow"] + np.array([0.0, -10.0]), 150.0, 180.0)
        return _Layout(marks["elbow"], 140.0, 180.0)
    if part is StudyType.HUMERUS:
        return _Layout(np.array([10.0, 415.0]), max(130.0, 380.0 / aspect), 180.0)
    # Shoulder.
    return _Layout(np.asarray(marks["shoulder"]) + np.array([40.0, 10.0]), 240.0, 180.0)


def _shoulder_y_scene(rng: np.random.Generator) -> _Scene:
    """Scapular Y view: the scapula end-on as a Y, the humeral head over its centre."""
    b = _Builder(rng, 0.0)
    b.bone((0, 20), (6, 170), 8.0, cortex=0.5, density=0.9, name="scapular body")
    b.bone((0, 18), (-55, -45), 7.0, flare=(0, 0.4), name="acromion")
    b.bone((2, 18), (48, -28), 5.5, flare=(0, 0.5), name="coracoid")
    head = b.blob((4, 12), 25.0, 26.0, cortex=0.1, name="humeral head")
    shaft = b.bone((6, 14), (14, 230), 12.0, flare=(0.8, 0.0), name="humerus")
    tuber = b.blob((-16, 6), 9.0, 12.0, cortex=0.15, name="greater tuberosity")
    b.blob((-40, -70), 10.0, 10.0, name="clavicle")
    for i in range(5):
        y = -20 + i * 40
        b.bone(
            (120, y),
            (20, y + 70),
            4.5,
            cortex=0.4,
            density=0.7,
            name=f"rib {i + 2}",
            fracturable=False,
        )
    b.soft_blob((0, 60), 95.0, 170.0, 90.0)
    b.soft((10, 0), (20, 240), 48.0)
    b.joint("shoulder", (4, 12), 22.0, (head, shaft, tuber))
    return b.scene


def _chest_scene(rng: np.random.Generator, view: str) -> _Scene:
    b = _Builder(rng, 0.0)
    if view == "LAT":
        b.soft_blob((0, 20), 125.0, 230.0, 160.0)
        b.air((-5, -15), 85.0, 160.0, 130.0)
        b.bone((84, -190), (92, 230), 19.0, cortex=0.4, density=0.55, name="spine")
        b.bone((-108, -175), (-114, 40), 6.0, density=0.8, name="sternum")
        b.soft_blob((-40, 60), 72.0, 70.0, 35.0, organ=True)
        for i in range(9):
            y = -150 + i * 32
            b.bone((85, y), (-100, y + 60), 4.0, cortex=0.4, density=0.5, name=f"rib {i + 2}")
        return b.scene
    b.soft_blob((0, 25), 175.0, 235.0, 120.0)
    for side in (-1, 1):
        b.air((side * 78, -10), 70.0, 150.0, 105.0)
        b.bone((side * 22, -185), (side * 165, -200), 8.0, flare=(0.4, 0.4), name="clavicle")
        for i in range(10):
            y = -165 + i * 30
            pts = [(side * 18, y), (side * 120, y - 4), (side * 165, y + 45)]
            for p, q in itertools.pairwise(pts):
                b.bone(p, q, 4.5, cortex=0.4, density=0.65, name=f"rib {i + 1}")
    b.soft_blob((28, 75), 78.0, 66.0, 38.0, organ=True)
    b.bone((0, -260), (0, 260), 20.0, cortex=0.4, density=0.5, name="spine", fracturable=False)
    return b.scene


def _knee_scene(rng: np.random.Generator, view: str) -> _Scene:
    if view == "LAT":
        b = _Builder(rng, 0.0)
        b.bone((-18, -270), (0, -22), 14.0, flare=(0.0, 1.3), name="femur")
        b.blob((4, -16), 28.0, 24.0, cortex=0.15, name="femoral condyles")
        tibia = b.bone((0, 14), (12, 270), 14.0, flare=(1.3, 0.0), name="tibia", flat0=True)
        fibula = b.bone((24, 32), (30, 270), 6.0, flare=(0.7, 0.0), name="fibula")
        b.blob((-46, -38), 12.0, 22.0, cortex=0.2, name="patella")
        b.soft((-10, -280), (0, 0), 70.0)
        b.soft((0, 0), (10, 280), 56.0)
        b.joint("knee", (0, 0), 20.0, (tibia, fibula))
        return b.scene
    alpha = {"OBL": 45.0}.get(view, 0.0) + float(rng.normal(0, 3))
    b = _Builder(rng, alpha)
    b.bone((0, -270), (0, -14), 14.0, flare=(0.0, 1.6), name="femur")
    b.blob((-20, -14, 0), 17.0, 14.0, cortex=0.15, name="lateral condyle")
    b.blob((20, -14, 0), 17.0, 14.0, cortex=0.15, name="medial condyle")
    tibia = b.bone((0, 10), (0, 270), 14.0, flare=(1.5, 0.0), name="tibia", flat0=True)
    fibula = b.bone((38, 30, -25), (42, 270, -25), 6.0, flare=(0.7, 0.0), name="fibula")
    b.blob((0, -30, 40), 20.0, 24.0, cortex=0.2, density=0.8, name="patella")
    b.soft((0, -280), (0, 0), 72.0, 68.0)
    b.soft((0, 0), (0, 280), 56.0, 52.0)
    b.joint("knee", (0, 0), 20.0, (tibia, fibula))
    return b.scene


def _build(
    part: StudyType | str, view: str, aspect: float, rng: np.random.Generator
) -> tuple[_Scene, _Layout]:
    if part == "CHEST":
        fov = 360.0 if view == "LAT" else 380.0
        return _chest_scene(rng, view), _Layout(np.array([0.0, 0.0]), fov, 0.0)
    if part == "KNEE":
        return _knee_scene(rng, view), _Layout(np.array([0.0, 0.0]), 190.0, 0.0)
    assert isinstance(part, StudyType)
    if part is StudyType.SHOULDER and view == "LAT":
        return _shoulder_y_scene(rng), _Layout(np.array([0.0, 30.0]), 240.0, 0.0)
    alpha, flex = _limb_pose(part, view, rng)
    scene, marks = _limb_scene(rng, alpha, flex, part is StudyType.SHOULDER)
    return scene, _frame_limb(part, view, marks, aspect, rng)


def field_of_view_mm(body_part: StudyType | str, rows: int, cols: int) -> float:
    """The short side of the rendered field in millimetres (for Imager Pixel Spacing)."""
    part = parse_body_part(body_part)
    aspect = max(rows, cols) / min(rows, cols)
    fixed = {
        StudyType.FINGER: 72.0,
        StudyType.HAND: 180.0,
        StudyType.WRIST: 100.0,
        StudyType.ELBOW: 140.0,
        StudyType.SHOULDER: 240.0,
        "CHEST": 380.0,
        "KNEE": 190.0,
    }
    if part is StudyType.FOREARM:
        return max(100.0, 320.0 / aspect)
    if part is StudyType.HUMERUS:
        return max(130.0, 380.0 / aspect)
    return fixed[part]


# --------------------------------------------------------------------------------------------
# Rasterisation (pixel space). Each function adds (or maxes, or multiplies) into `layer`
# inside the primitive's bounding box. `per_px` converts pixel path lengths to millimetres.


def _window(
    x0: float, x1: float, y0: float, y1: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]] | None:
    rows, cols = shape
    r0, r1 = max(math.floor(y0), 0), min(math.ceil(y1) + 1, rows)
    c0, c1 = max(math.floor(x0), 0), min(math.ceil(x1) + 1, cols)
    if r0 >= r1 or c0 >= c1:
        return None
    ys = np.arange(r0, r1, dtype=np.float32)[:, None]
    xs = np.arange(c0, c1, dtype=np.float32)[None, :]
    return ys, xs, (slice(r0, r1), slice(c0, c1))


def _tube_values(
    tube: _Tube, shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    rmax = tube.r * (1 + max(tube.flare0, tube.flare1)) + 1
    (ax, ay), (bx, by) = tube.p0, tube.p1
    win = _window(
        min(ax, bx) - rmax, max(ax, bx) + rmax, min(ay, by) - rmax, max(ay, by) + rmax, shape
    )
    if win is None:
        return None
    ys, xs, sl = win
    dx, dy = float(bx - ax), float(by - ay)
    length2 = max(dx * dx + dy * dy, 1e-6)
    rx, ry = xs - np.float32(ax), ys - np.float32(ay)
    u = np.clip((rx * dx + ry * dy) * (1.0 / length2), 0.0, 1.0)
    ex = rx - u * dx
    ey = ry - u * dy
    d2 = ex * ex + ey * ey
    if tube.flare0 == tube.flare1 == 0.0:
        # Soft tissue and wires, the largest windows: skip the per-pixel flare profile.
        w0 = w1 = 0.0
        rr: Any = tube.r
    else:
        w0, w1 = _flare_weights(u)
        rr = tube.r * (1.0 + tube.flare0 * w0 + tube.flare1 * w1)
    outer = np.sqrt(np.maximum(rr * rr - d2, 0.0))
    if tube.cortex >= 1.0:
        values = (2.0 * tube.mu_c) * outer
    else:
        # Thinner cortex at the metaphyses and epiphyses, as in real long bones.
        cortex = tube.cortex * (1.0 - 0.6 * (w0 + w1))
        ri = rr * (1.0 - cortex)
        inner = np.sqrt(np.maximum(ri * ri - d2, 0.0))
        values = 2.0 * (tube.mu_c * (outer - inner) + tube.mu_m * inner)
    for (px, py), (nx, ny) in tube.clips:
        side = (xs - np.float32(px)) * float(nx) + (ys - np.float32(py)) * float(ny)
        values = values * np.clip(side + 0.5, 0.0, 1.0)
    return values, sl


def _blob_values(
    blob: _Blob, shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    ext = max(blob.a, blob.b) + 1
    cx, cy = blob.c
    win = _window(cx - ext, cx + ext, cy - ext, cy + ext, shape)
    if win is None:
        return None
    ys, xs, sl = win
    ca, sa = math.cos(blob.angle), math.sin(blob.angle)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    u = (dx * ca + dy * sa) * (1.0 / blob.a)
    v = (dy * ca - dx * sa) * (1.0 / blob.b)
    q = u * u + v * v
    outer = blob.depth * np.sqrt(np.maximum(1.0 - q, 0.0))
    if blob.cortex >= 1.0:
        values = (2.0 * blob.mu_c) * outer
    else:
        k = 1.0 - blob.cortex
        inner = (blob.depth * k) * np.sqrt(np.maximum(1.0 - q * (1.0 / (k * k)), 0.0))
        values = 2.0 * (blob.mu_c * (outer - inner) + blob.mu_m * inner)
    return values, sl


def _box_values(box: _Box, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    ext = math.hypot(box.half_len, box.half_wid) + 1
    cx, cy = box.c
    win = _window(cx - ext, cx + ext, cy - ext, cy + ext, shape)
    if win is None:
        return None
    ys, xs, sl = win
    ca, sa = math.cos(box.angle), math.sin(box.angle)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    u = np.abs(dx * ca + dy * sa)
    v = np.abs(dy * ca - dx * sa)
    values = np.clip(box.half_len - u + 0.5, 0.0, 1.0) * np.clip(box.half_wid - v + 0.5, 0.0, 1.0)
    if box.pitch > 2.0:
        # Screw threads: the outer third of the shaft alternates along its length.
        thread = np.sin((dx * ca + dy * sa) * (2 * math.pi / box.pitch)) > 0
        values = values * np.where((v > box.half_wid * 0.65) & thread, 0.35, 1.0)
    return values * box.value, sl


def _values(prim: Any, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    if isinstance(prim, _Tube):
        return _tube_values(prim, shape)
    if isinstance(prim, _Blob):
        return _blob_values(prim, shape)
    return _box_values(prim, shape)


def _apply_hole(layer: np.ndarray, hole: _Hole) -> None:
    ext = max(hole.a, hole.b) * 1.2 + 1
    cx, cy = hole.c
    win = _window(cx - ext, cx + ext, cy - ext, cy + ext, layer.shape)  # type: ignore[arg-type]
    if win is None:
        return
    ys, xs, sl = win
    ca, sa = math.cos(hole.angle), math.sin(hole.angle)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    u = (dx * ca + dy * sa) * (1.0 / hole.a)
    v = (dy * ca - dx * sa) * (1.0 / hole.b)
    q = np.sqrt(u * u + v * v)
    mask = np.clip((1.15 - q) / 0.3, 0.0, 1.0)
    layer[sl] *= 1.0 - hole.strength * mask


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - w
    m[np.arange(n_out), i1] += w
    return m


def _smooth_field(rng: np.random.Generator, rows: int, cols: int, cells: int) -> np.ndarray:
    """Band-limited noise in about -1..1: a coarse random grid interpolated bilinearly."""
    gh = max(2, round(cells * rows / max(rows, cols)))
    gw = max(2, round(cells * cols / max(rows, cols)))
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return _interp_matrix(rows, gh) @ grid @ _interp_matrix(cols, gw).T


_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


# --------------------------------------------------------------------------------------------
# Findings (pixel space).


def _inner(p: np.ndarray, shape: tuple[int, int], margin: float = 0.1) -> bool:
    rows, cols = shape
    return (margin * cols <= p[0] <= (1 - margin) * cols) and (
        margin * rows <= p[1] <= (1 - margin) * rows
    )


def _candidates(
    scene: _Scene, shape: tuple[int, int], min_r_frac: float = 0.014, min_len_r: float = 3.0
) -> list[tuple[int, list[float]]]:
    """Fracturable tubes whose radius is at least *min_r_frac* of the image's short side (so a
    finding on them survives downscaling to 64 px), with axis positions in view."""
    min_r = min_r_frac * min(shape)
    out = []
    for index, bone in enumerate(scene.bones):
        if not isinstance(bone, _Tube) or not bone.fracturable or bone.r < min_r:
            continue
        if bone.length < min_len_r * 2 * bone.r:
            continue
        ts = [
            float(t)
            for t in np.linspace(0.15, 0.85, 29)
            if _inner(bone.at(t), shape) and _kept(bone, float(t))
        ]
        if len(ts) >= 3:
            out.append((index, ts))
    return out


def _kept(bone: _Tube, t: float) -> bool:
    """Whether the axis point at *t* is still bone after the tube's cuts (a fracture fragment
    keeps only its side of the fracture line), with a margin of one radius."""
    p = bone.at(t)
    margin = bone.radius_at(t)
    return all(float((p - point) @ normal) >= margin for point, normal in bone.clips)


def _pick_bone(
    candidates: list[tuple[int, list[float]]], scene: _Scene, rng: np.random.Generator
) -> tuple[int, list[float]]:
    # Bigger bones are likelier: a finding on a large bone survives downscaling.
    weights = np.array([scene.bones[i].r ** 2 * len(ts) for i, ts in candidates], float)
    return candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]


def _perp(v: np.ndarray) -> np.ndarray:
    return np.array([-v[1], v[0]])


def _rot(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _fracture(
    scene: _Scene,
    rng: np.random.Generator,
    shape: tuple[int, int],
    displaced: bool = True,
    chosen: tuple[int, float] | None = None,
    min_r_frac: float = 0.018,
) -> Finding | None:
    if chosen is None:
        cands = _candidates(scene, shape, min_r_frac=min_r_frac)
        if not cands:
            return None
        index, ts = _pick_bone(cands, scene, rng)
        t = float(rng.choice(ts))
    else:
        index, t = chosen
    bone = scene.bones[index]
    assert isinstance(bone, _Tube)
    f = bone.at(t)
    axis = bone.axis
    rr = bone.radius_at(t)
    obliquity = math.radians(rng.uniform(-12, 12) if rng.random() < 0.5 else rng.uniform(25, 50))
    obliquity *= 1 if rng.random() < 0.5 else -1
    normal = _rot(axis, obliquity)  # points to the p1 fragment
    gap = max(1.5, float(rng.uniform(0.2, 0.4)) * 2 * rr)
    near = replace(bone, clips=(*bone.clips, (f - normal * gap / 2, -normal)))
    far = replace(bone, clips=(*bone.clips, (f + normal * gap / 2, normal)))
    detail = "non-displaced"
    if displaced:
        angulation = math.radians(rng.uniform(12, 32)) * (1 if rng.random() < 0.5 else -1)
        side = 1 if rng.random() < 0.5 else -1
        shift = _perp(axis) * side * float(rng.uniform(0.6, 1.2)) * 2 * rr
        shift = shift + axis * float(rng.uniform(-0.35, 0.05)) * 2 * rr
        far = far.transformed(_Affine.rigid(angulation, f, shift))
        detail = "displaced"
        # Swelling: soft tissue bulges around an acute fracture.
        scene.organs.append(
            _Blob(
                f,
                3.5 * rr,
                2.8 * rr,
                float(rng.uniform(1.5, 2.5)) * rr,
                angle=math.atan2(axis[1], axis[0]),
                cortex=1.0,
                mu_c=_MU_SOFT,
                mu_m=0.0,
            )
        )
        if rng.random() < 0.4:
            detail = "healing"
            scene.bones.append(
                _Blob(
                    f + shift / 2,
                    1.9 * rr,
                    1.55 * rr,
                    1.3 * rr,
                    angle=math.atan2(axis[1], axis[0]),
                    cortex=1.0,
                    mu_c=_MU_MEDULLA * 0.9,
                    mu_m=0.0,
                    name="callus",
                )
            )
    scene.bones[index] = near
    scene.bones.append(far)
    return Finding("fracture", detail, bone.name, float(f[1]), float(f[0]), float(2.5 * rr))


def _screw(
    center: np.ndarray, direction: np.ndarray, half_len: float, rr: float, head_side: float
) -> list[_Box]:
    angle = math.atan2(direction[1], direction[0])
    shaft_w = max(0.8, 0.2 * rr)
    head = center + direction * head_side * (half_len + 0.1 * rr)
    return [
        _Box(center, half_len, shaft_w, angle, 3.0 * _MU_METAL, pitch=max(0.45 * rr, 2.0)),
        _Box(head, max(0.6, 0.12 * rr), max(1.2, 0.34 * rr), angle, 4.0 * _MU_METAL),
    ]


def _hardware(scene: _Scene, rng: np.random.Generator, shape: tuple[int, int]) -> Finding | None:
    cands = _candidates(scene, shape)
    heads = [
        i
        for i, b in enumerate(scene.bones)
        if isinstance(b, _Blob) and b.name == "humeral head" and _inner(b.c, shape, 0.05)
    ]
    options = ["plate", "kwires", "screws"] if cands else []
    if heads:
        options.append("arthroplasty")
    if not options:
        return None
    kind = str(rng.choice(options))
    if kind == "arthroplasty":
        head = scene.bones[heads[0]]
        assert isinstance(head, _Blob)
        scene.bones[heads[0]] = replace(head, mu_c=0.0, mu_m=0.0)
        ball = _Blob(
            head.c,
            head.a * 0.95,
            head.b * 0.95,
            head.depth * 0.5,
            cortex=1.0,
            mu_c=_MU_METAL,
            mu_m=0.0,
        )
        shafts = [b for b in scene.bones if isinstance(b, _Tube) and b.name == "humerus"]
        scene.metal.append(ball)
        if shafts:
            shaft = shafts[0]
            near_end = (
                shaft.p0
                if np.hypot(*(shaft.p0 - head.c)) < np.hypot(*(shaft.p1 - head.c))
                else shaft.p1
            )
            far_end = shaft.p1 if near_end is shaft.p0 else shaft.p0
            tip = near_end + (far_end - near_end) * 0.35
            scene.metal.append(
                _Tube(head.c, tip, shaft.r * 0.45, cortex=1.0, mu_c=_MU_METAL, mu_m=0.0)
            )
        return Finding(
            "hardware",
            "arthroplasty",
            "humeral head",
            float(head.c[1]),
            float(head.c[0]),
            float(max(head.a, head.b) * 1.5),
        )
    index, ts = _pick_bone(cands, scene, rng)
    bone = scene.bones[index]
    assert isinstance(bone, _Tube)
    axis, across = bone.axis, _perp(bone.axis)
    t = float(rng.choice(ts))
    center = bone.at(t)
    rr = bone.radius_at(t)
    if kind == "plate":
        span = [x for x in ts if abs(x - t) * bone.length < 0.3 * bone.length]
        t0, t1 = min(span), max(span)
        half = min(float(rng.uniform(0.18, 0.28)) * bone.length, (t1 - t0) * bone.length / 2 + rr)
        half = max(half, 2.5 * rr)
        offset = float(rng.uniform(-0.5, 0.5)) * rr
        angle = math.atan2(axis[1], axis[0])
        plate_c = center + across * offset
        scene.metal.append(_Box(plate_c, half, 0.62 * rr, angle, 3.5 * _MU_METAL))
        count = int(np.clip(round(2 * half / (1.7 * rr)), 3, 8))
        for k in range(count):
            along = (k + 0.5) / count * 2 * half - half
            tilt = _rot(across, math.radians(rng.uniform(-8, 8)))
            scene.metal.extend(_screw(center + axis * along, tilt, 1.15 * rr, rr, 1.0))
        if rng.random() < 0.6:
            _fracture(scene, rng, shape, displaced=False, chosen=(index, t))
        return Finding(
            "hardware", "plate", bone.name, float(center[1]), float(center[0]), float(half + rr)
        )
    if kind == "kwires":
        n = int(rng.integers(1, 4))
        wire_r = max(0.6, 0.16 * rr, 0.004 * min(shape))
        for _ in range(n):
            direction = _rot(axis, math.radians(rng.uniform(15, 40) * rng.choice([-1, 1])))
            start = center + axis * float(rng.uniform(-1.5, 1.5)) * rr
            length = float(rng.uniform(4.0, 7.0)) * rr
            scene.metal.append(
                _Tube(
                    start - direction * length * 0.35,
                    start + direction * length * 0.65,
                    wire_r,
                    cortex=1.0,
                    mu_c=_MU_METAL * 2.5,
                    mu_m=0.0,
                )
            )
        return Finding(
            "hardware", "k-wires", bone.name, float(center[1]), float(center[0]), float(4.5 * rr)
        )
    n = int(rng.integers(2, 4))
    for k in range(n):
        c = center + axis * (k - (n - 1) / 2) * 1.6 * rr
        direction = _rot(across, math.radians(rng.uniform(-35, 35)))
        scene.metal.extend(_screw(c, direction, 1.25 * rr, rr, 1.0 if rng.random() < 0.5 else -1.0))
    return Finding(
        "hardware", "screws", bone.name, float(center[1]), float(center[0]), float(2.5 * rr)
    )


def _lesion(scene: _Scene, rng: np.random.Generator, shape: tuple[int, int]) -> Finding | None:
    cands = _candidates(scene, shape, min_r_frac=0.028)
    if not cands:
        return None
    index, ts = _pick_bone(cands, scene, rng)
    bone = scene.bones[index]
    assert isinstance(bone, _Tube)
    t = float(rng.choice(ts))
    rr = bone.radius_at(t)
    axis = bone.axis
    center = bone.at(t) + _perp(axis) * float(rng.uniform(-0.2, 0.2)) * rr
    a = float(rng.uniform(1.2, 2.2)) * rr
    b = float(rng.uniform(0.65, 0.9)) * rr
    angle = math.atan2(axis[1], axis[0])
    detail = "lytic"
    if rng.random() < 0.35:
        # Expansile: the cortex bulges around the lesion.
        detail = "expansile lytic"
        scene.bones.append(
            _Blob(
                center, a * 1.05, rr * 1.25, rr * 1.1, angle=angle, cortex=0.12, name="lesion rim"
            )
        )
    elif rng.random() < 0.5:
        detail = "lytic with sclerotic rim"
        scene.bones.append(
            _Blob(
                center,
                a * 1.12,
                b * 1.2,
                b,
                angle=angle,
                cortex=0.22,
                mu_c=_MU_CORTEX * 0.8,
                mu_m=0.0,
                name="lesion rim",
            )
        )
    scene.holes.append(_Hole(center, a, b, angle, float(rng.uniform(0.75, 0.95))))
    return Finding("lesion", detail, bone.name, float(center[1]), float(center[0]), float(a * 1.3))


def _dislocation(scene: _Scene, rng: np.random.Generator, shape: tuple[int, int]) -> Finding | None:
    min_size = 0.025 * min(shape)
    joints = [j for j in scene.joints if _inner(j.center, shape, 0.12) and j.size >= min_size]
    if not joints:
        return None
    weights = np.array([j.size for j in joints], float)
    joint = joints[int(rng.choice(len(joints), p=weights / weights.sum()))]
    angle = math.radians(rng.uniform(15, 40)) * (1 if rng.random() < 0.5 else -1)
    direction = _rot(np.array([1.0, 0.0]), float(rng.uniform(0, 2 * math.pi)))
    shift = direction * float(rng.uniform(1.0, 1.6)) * joint.size
    move = _Affine.rigid(angle, joint.center, shift)
    for i in joint.distal:
        scene.bones[i] = scene.bones[i].transformed(move)
    return Finding(
        "dislocation",
        joint.name,
        joint.name,
        float(joint.center[1]),
        float(joint.center[0]),
        float(joint.size * 2.5),
    )


_MAKERS = {
    "fracture": _fracture,
    "hardware": _hardware,
    "lesion": _lesion,
    "dislocation": _dislocation,
}


def _add_findings(scene: _Scene, rng: np.random.Generator, shape: tuple[int, int]) -> list[Finding]:
    wanted = 1 if rng.random() < 0.65 else 2
    kinds = list(rng.permutation(["fracture", "fracture", "hardware", "lesion", "dislocation"]))
    found: list[Finding] = []
    tried: set[str] = set()
    for kind in kinds:
        if len(found) >= wanted or kind in tried:
            continue
        tried.add(kind)
        finding = _MAKERS[kind](scene, rng, shape)
        if finding is not None:
            found.append(finding)
    if not found:
        # Only small bones in view: a fracture on one of them beats an unlabelled abnormal.
        finding = _fracture(scene, rng, shape, min_r_frac=0.0)
        if finding is not None:
            found.append(finding)
    return found


# --------------------------------------------------------------------------------------------


def render_phantom_with_findings(
    body_part: StudyType | str,
    view: str,
    rows: int,
    cols: int,
    abnormal: bool,
    rng: np.random.Generator,
    *,
    laterality: str | None = None,
) -> tuple[np.ndarray, list[Finding]]:
    """Render a radiograph phantom and say where its findings are (empty when normal).

    Returns a float32 (rows, cols) array in 0..1, higher meaning more attenuation (bone bright
    as displayed in MONOCHROME2), and the findings in pixel coordinates.
    """
    part = parse_body_part(body_part)
    view = normalise_view(view)
    if rows < 16 or cols < 16:
        raise ValueError("rows and cols must be at least 16")
    seeds = rng.integers(0, 2**63 - 1, size=4)
    anatomy_rng, finding_rng, detector_rng, place_rng = (np.random.default_rng(s) for s in seeds)
    shape = (rows, cols)
    aspect = max(rows, cols) / min(rows, cols)
    scene_mm, layout = _build(part, view, aspect, anatomy_rng)

    if laterality is None:
        laterality = "L" if place_rng.random() < 0.5 else "R"
    mirror = laterality.upper().startswith("L")
    # The layout's rotation assumes no mirror; a mirrored scene turns the other way.
    theta = layout.rotation_deg * (-1.0 if mirror else 1.0) + float(place_rng.normal(0, 6))
    if cols > rows:
        theta += 90.0 if place_rng.random() < 0.5 else -90.0
    zoom = float(place_rng.uniform(0.9, 1.08))
    s = min(rows, cols) / layout.fov * zoom
    c, sn = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    m = s * np.array([[c, -sn], [sn, c]]) @ np.diag([-1.0 if mirror else 1.0, 1.0])
    shift = place_rng.uniform(-0.04, 0.04, 2) * np.array([cols, rows])
    offset = np.array([cols / 2, rows / 2]) + shift - m @ layout.center
    scene = scene_mm.transformed(_Affine(m, offset))

    findings = _add_findings(scene, finding_rng, shape) if abnormal else []

    per_px = 1.0 / s  # pixel path lengths → millimetres
    soft = np.zeros(shape, np.float32)
    for prim in scene.envelope:
        got = _values(prim, shape)
        if got is not None:
            np.maximum(soft[got[1]], got[0] * per_px, out=soft[got[1]])
    for prim in scene.organs:
        got = _values(prim, shape)
        if got is not None:
            soft[got[1]] += got[0] * per_px
    for prim in scene.air:
        got = _values(prim, shape)
        if got is not None:
            soft[got[1]] -= got[0] * per_px
    np.maximum(soft, 0.0, out=soft)
    bone = np.zeros(shape, np.float32)
    for prim in scene.bones:
        got = _values(prim, shape)
        if got is not None:
            bone[got[1]] += got[0] * per_px
    for hole in scene.holes:
        _apply_hole(bone, hole)
    texture = _smooth_field(detector_rng, rows, cols, 48)
    texture *= 0.1
    texture += 1.0
    bone *= texture
    del texture

    attenuation = soft
    attenuation += bone
    # Normalise like the reader's processing would, from the anatomy alone (metal excluded,
    # so hardware saturates instead of darkening the rest of the image).
    sample = attenuation[:: max(1, rows // 256), :: max(1, cols // 256)]
    reference = float(np.percentile(sample, 99.5))
    reference = max(reference, 1e-3)
    for prim in scene.metal:
        got = _values(prim, shape)
        if got is not None:
            attenuation[got[1]] += got[0] if isinstance(prim, _Box) else got[0] * per_px

    gain = float(detector_rng.uniform(1.2, 2.0))
    floor = float(detector_rng.uniform(0.02, 0.08))
    top = float(detector_rng.uniform(0.82, 0.9))
    # In place from here on: these are the only full-image passes left (1 - exp(-x) tone).
    attenuation *= -gain / reference
    image = np.expm1(attenuation, out=attenuation)
    image *= -(top - floor) / (-math.expm1(-gain))
    image += floor
    # Heel effect and scatter: a gentle low-frequency exposure gradient.
    heel = _smooth_field(detector_rng, rows, cols, 4)
    heel *= 0.02
    image += heel
    noise = detector_rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(detector_rng.uniform(0.006, 0.014))
    image += noise
    del heel, noise
    if detector_rng.random() < 0.3:
        _collimate(image, detector_rng)
    if detector_rng.random() < 0.6:
        _marker(image, laterality.upper()[:1] if laterality else "R", detector_rng)
    np.clip(image, 0.0, 1.0, out=image)
    return image, findings


def render_phantom(
    body_part: StudyType | str,
    view: str,
    rows: int,
    cols: int,
    abnormal: bool,
    rng: np.random.Generator,
    *,
    laterality: str | None = None,
) -> np.ndarray:
    """Render a radiograph phantom: float32 (rows, cols) in 0..1, bone bright (MONOCHROME2).

    *body_part* is a :class:`StudyType` (or its name) or "CHEST"/"KNEE"; *view* one of AP, PA,
    LAT, OBL (or an alias such as "LATERAL"). Abnormal phantoms carry one or two findings.
    The result depends only on *rng*'s state and the arguments.
    """
    image, _ = render_phantom_with_findings(
        body_part, view, rows, cols, abnormal, rng, laterality=laterality
    )
    return image


def _collimate(image: np.ndarray, rng: np.random.Generator) -> None:
    rows, cols = image.shape
    value = np.float32(rng.uniform(0.7, 0.92))
    margins = rng.uniform(0.0, 0.07, 4) * (rng.random(4) < 0.7)
    top, bottom = int(margins[0] * rows), int(margins[1] * rows)
    left, right = int(margins[2] * cols), int(margins[3] * cols)
    if top:
        image[:top] = value
    if bottom:
        image[rows - bottom :] = value
    if left:
        image[:, :left] = value
    if right:
        image[:, cols - right :] = value


def _marker(image: np.ndarray, letter: str, rng: np.random.Generator) -> None:
    glyph = np.array([[ch == "1" for ch in row] for row in _GLYPHS.get(letter, _GLYPHS["R"])])
    rows, cols = image.shape
    k = max(1, round(0.045 * min(rows, cols) / glyph.shape[0]))
    block = np.kron(glyph, np.ones((k, k), bool))
    bh, bw = block.shape
    if bh + 4 > rows or bw + 4 > cols:
        return
    margin_r, margin_c = int(0.04 * rows), int(0.04 * cols)
    r0 = margin_r if rng.random() < 0.5 else rows - margin_r - bh
    c0 = margin_c if rng.random() < 0.5 else cols - margin_c - bw
    region = image[r0 : r0 + bh, c0 : c0 + bw]
    region[block] = np.float32(0.97)
