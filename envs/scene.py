"""The tabletop scene, built once with MjSpec and reconfigured at every reset.

The compiled model has a fixed set of *slots*: `N_OBJECT_SLOTS` movable bodies, each carrying a
box, a cylinder and a sphere geom of which reset switches exactly one on, and `N_PAD_SLOTS` flat
target pads. Reset and the perturbation wrappers only edit `mjModel` fields (rgba, contype,
group, positions, lights, cameras, texture pixels), so one model and one GL context serve every
episode: no recompiling, no new renderer per reset.

World frame: the table top is z = 0, x points right and y points up in the default "top"
camera image, so "top-left" means (-x, +y).
"""

from __future__ import annotations

import atexit
import weakref

import mujoco
import numpy as np

TABLE_HALF = 0.25  # the free table area is [-TABLE_HALF, TABLE_HALF]^2 (metres)
WALL_HEIGHT = 0.04
WALL_THICKNESS = 0.02
OBJECT_HALF = 0.03  # half-size of every object shape (cube half-edge, cylinder/sphere radius)
OBJECT_MASS = 0.1
PUSHER_RADIUS = 0.025
PAD_RADIUS = 0.055
N_OBJECT_SLOTS = 6  # up to 4 task objects plus room for distractor objects
N_PAD_SLOTS = 3

SHAPES = ("cube", "cylinder", "sphere")
_SHAPE_GEOM = {
    "cube": mujoco.mjtGeom.mjGEOM_BOX,
    "cylinder": mujoco.mjtGeom.mjGEOM_CYLINDER,
    "sphere": mujoco.mjtGeom.mjGEOM_SPHERE,
}

# The named palette. Instructions name these colours, so perturbations must keep them.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.12, 0.65, 0.18),
    "blue": (0.12, 0.28, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.18, 0.75),
    "orange": (1.00, 0.50, 0.05),
}
TABLE_RGB = (0.78, 0.74, 0.68)
TABLE_TEXTURE_SIZE = 64
HIDDEN_GROUP = 3  # geom group the renderer does not draw (mjvOption shows groups 0-2)

# Named cameras: (position, look-at target). Quaternions are derived with `look_at`.
CAMERAS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "top": ((0.0, 0.0, 0.62), (0.0, 0.0, 0.0)),
    "front": ((0.0, -0.62, 0.55), (0.0, -0.02, 0.0)),
    "side": ((0.62, 0.0, 0.55), (0.02, 0.0, 0.0)),
}
CAMERA_FOVY = 50.0


def camera_axes(pos, target, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """The rotation [3, 3] whose columns are the camera's right, up and back axes in the world frame,
    for a camera at `pos` looking at `target`.

    A MuJoCo camera looks along its -z axis with +y up in the image. `up` is only a hint; for
    views that are not straight down, world +z is used so the horizon stays level.
    """
    pos, target = np.asarray(pos, float), np.asarray(target, float)
    back = pos - target
    back /= np.linalg.norm(back)
    up = np.asarray(up, float) if abs(back[2]) > 0.99 else np.array([0.0, 0.0, 1.0])
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(back, right), back], axis=1)


def look_at(pos, target) -> np.ndarray:
    """Quaternion (w, x, y, z) of a MuJoCo camera at `pos` looking at `target`."""
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, camera_axes(pos, target).flatten())
    return quat


def image_coords(points, camera: str = "top") -> np.ndarray:
    """Where world points [..., 3] appear in a square image of the named camera at its nominal
    pose: [..., 2] as (u, v), from -1 at the left / top edge to 1 at the right / bottom edge."""
    pos, target = CAMERAS[camera]
    cam = (np.asarray(points, float) - pos) @ camera_axes(pos, target)  # camera frame: x right, y up, z back
    focal = 1.0 / np.tan(np.radians(CAMERA_FOVY) / 2)
    return focal * np.stack([cam[..., 0], -cam[..., 1]], axis=-1) / -cam[..., 2:3]


# What the lights make of a colour on a face turned up to the top camera (measured: 1.5-1.6).
LIGHT_GAIN = 1.5


def pad_rgb(colour: str) -> tuple[float, float, float]:
    """Pads are a paler tint of their colour so an object resting on one stays visible. The tint
    is divided by the light gain so the camera sees it rather than white: undivided, the orange
    and yellow pads both rendered as (255, 255, ~170) and no pixel told them apart."""
    return tuple((0.6 * c + 0.4) / LIGHT_GAIN for c in COLOURS[colour])


def build_spec(max_image_size: int = 640) -> mujoco.MjSpec:
    """The whole scene as an MjSpec. `max_image_size` sizes the offscreen framebuffer."""
    spec = mujoco.MjSpec()
    spec.modelname = "foresight_tabletop"
    spec.option.timestep = 0.01  # 10 substeps per 10 Hz control step
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    # No shadows and no multisampling: with them, software rendering is ~30x slower.
    spec.visual.quality.shadowsize = 0
    spec.visual.quality.offsamples = 0
    spec.visual.global_.offwidth = max(640, max_image_size)
    spec.visual.global_.offheight = max(480, max_image_size)
    spec.visual.headlight.ambient = [0.35, 0.35, 0.35]
    spec.visual.headlight.diffuse = [0.35, 0.35, 0.35]
    spec.visual.headlight.specular = [0.0, 0.0, 0.0]
    spec.stat.center = [0.0, 0.0, 0.0]
    spec.stat.extent = 0.8

    # The table texture: its pixels are rewritten at run time by the table perturbation.
    tex = spec.add_texture()
    tex.name = "table"
    tex.type = mujoco.mjtTexture.mjTEXTURE_2D
    tex.builtin = mujoco.mjtBuiltin.mjBUILTIN_FLAT
    tex.rgb1 = list(TABLE_RGB)
    tex.width = tex.height = TABLE_TEXTURE_SIZE
    mat = spec.add_material()
    mat.name = "table"
    mat.textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = "table"
    mat.texrepeat = [1.0, 1.0]
    mat.texuniform = False
    mat.specular = 0.1

    world = spec.worldbody
    light = world.add_light()
    light.name = "sun"
    light.pos = [0.0, 0.0, 1.5]
    light.dir = [0.0, 0.0, -1.0]
    light.directional = True
    light.castshadow = False
    light.diffuse = [0.6, 0.6, 0.6]
    light.ambient = [0.1, 0.1, 0.1]
    light.specular = [0.1, 0.1, 0.1]

    table_half = TABLE_HALF + WALL_THICKNESS
    # Objects collide with a plane (analytic contacts for all three shapes; cylinder-box
    # contacts jitter and make resting cylinders creep), but we draw a box: MuJoCo renders a
    # plane as a subdivided grid, which doubled the cost of a 64x64 frame.
    table = world.add_geom()
    table.name = "table"
    table.type = mujoco.mjtGeom.mjGEOM_PLANE
    table.size = [table_half, table_half, 0.01]
    table.friction = [0.5, 0.005, 0.0001]
    table.group = HIDDEN_GROUP
    top = world.add_geom()
    top.name = "table_top"
    top.type = mujoco.mjtGeom.mjGEOM_BOX
    top.size = [table_half, table_half, 0.01]
    top.pos = [0.0, 0.0, -0.01]
    top.material = "table"
    top.contype = top.conaffinity = 0

    # Four low walls keep objects on the table.
    wall_mid = TABLE_HALF + WALL_THICKNESS / 2
    for name, pos, size in (
        ("wall_left", (-wall_mid, 0, WALL_HEIGHT / 2), (WALL_THICKNESS / 2, table_half, WALL_HEIGHT / 2)),
        ("wall_right", (wall_mid, 0, WALL_HEIGHT / 2), (WALL_THICKNESS / 2, table_half, WALL_HEIGHT / 2)),
        ("wall_bottom", (0, -wall_mid, WALL_HEIGHT / 2), (table_half, WALL_THICKNESS / 2, WALL_HEIGHT / 2)),
        ("wall_top", (0, wall_mid, WALL_HEIGHT / 2), (table_half, WALL_THICKNESS / 2, WALL_HEIGHT / 2)),
    ):
        wall = world.add_geom()
        wall.name = name
        wall.type = mujoco.mjtGeom.mjGEOM_BOX
        wall.pos = list(pos)
        wall.size = list(size)
        wall.rgba = [0.45, 0.42, 0.40, 1.0]

    # Pads: flat discs without collision, placed and coloured at reset.
    for i in range(N_PAD_SLOTS):
        pad = world.add_geom()
        pad.name = f"pad{i}"
        pad.type = mujoco.mjtGeom.mjGEOM_CYLINDER
        pad.size = [PAD_RADIUS, 0.001, 0]
        pad.pos = [0.0, 0.0, 0.001]
        pad.contype = pad.conaffinity = 0
        pad.group = HIDDEN_GROUP

    # The pusher: a vertical cylinder on two slide joints, driven by velocity servos.
    pusher = world.add_body()
    pusher.name = "pusher"
    pusher.pos = [0.0, 0.0, 0.026]
    for axis, name in (((1, 0, 0), "pusher_x"), ((0, 1, 0), "pusher_y")):
        joint = pusher.add_joint()
        joint.name = name
        joint.type = mujoco.mjtJoint.mjJNT_SLIDE
        joint.axis = list(axis)
        joint.damping = 1.0
        act = spec.add_actuator()
        act.name = name
        act.trntype = mujoco.mjtTrn.mjTRN_JOINT
        act.target = name
        kv = 60.0
        act.gainprm[0] = kv
        act.biastype = mujoco.mjtBias.mjBIAS_AFFINE
        act.biasprm[:3] = [0.0, 0.0, -kv]
        act.ctrllimited = True
        act.ctrlrange = [-1.0, 1.0]
    tip = pusher.add_geom()
    tip.name = "pusher"
    tip.type = mujoco.mjtGeom.mjGEOM_CYLINDER
    tip.size = [PUSHER_RADIUS, 0.025, 0]
    tip.mass = 1.0
    tip.rgba = [0.15, 0.15, 0.15, 1.0]
    tip.friction = [0.3, 0.005, 0.0001]

    for i in range(N_OBJECT_SLOTS):
        body = world.add_body()
        body.name = f"obj{i}"
        body.pos = [0.0, 0.0, OBJECT_HALF]
        body.explicitinertial = True
        body.ipos = [0.0, 0.0, 0.0]  # MjSpec leaves it unset (NaN) unless given
        body.mass = OBJECT_MASS
        body.inertia = list(shape_inertia("cube"))
        free = body.add_freejoint()
        free.name = f"obj{i}"
        # A little damping stands in for rolling resistance, so spheres do not roll forever.
        free.damping = 0.005
        for shape in SHAPES:
            geom = body.add_geom()
            geom.name = f"obj{i}_{shape}"
            geom.type = _SHAPE_GEOM[shape]
            geom.size = {"cube": [OBJECT_HALF] * 3, "cylinder": [OBJECT_HALF, OBJECT_HALF, 0],
                         "sphere": [OBJECT_HALF, 0, 0]}[shape]
            geom.friction = [0.5, 0.005, 0.002]
            geom.condim = 6 if shape == "sphere" else 3  # rolling friction for spheres
            geom.solimp = [0.99, 0.999, 0.001, 0.5, 2.0]  # firm contact: resting spheres stay put
            geom.contype = geom.conaffinity = 0
            geom.group = HIDDEN_GROUP

    for name, (pos, target) in CAMERAS.items():
        cam = world.add_camera()
        cam.name = name
        cam.pos = list(pos)
        cam.quat = list(look_at(pos, target))
        cam.fovy = CAMERA_FOVY
    return spec


def shape_inertia(shape: str) -> tuple[float, float, float]:
    """Principal moments of inertia of a solid shape of mass OBJECT_MASS and half-size OBJECT_HALF."""
    m, h = OBJECT_MASS, OBJECT_HALF
    if shape == "cube":
        i = m * (2 * h) ** 2 / 6
        return (i, i, i)
    if shape == "cylinder":  # radius h, height 2h, axis z
        ixx = m * (3 * h**2 + (2 * h) ** 2) / 12
        return (ixx, ixx, m * h**2 / 2)
    i = 2 * m * h**2 / 5
    return (i, i, i)


class SceneIndex:
    """Ids of everything reset and the wrappers touch, looked up once per compiled model."""

    def __init__(self, model: mujoco.MjModel):
        def gid(name):
            return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name)

        self.table_geom = gid("table_top")
        self.table_mat = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_MATERIAL, "table")
        self.table_tex = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_TEXTURE, "table")
        self.pad_geoms = [gid(f"pad{i}") for i in range(N_PAD_SLOTS)]
        self.pusher_geom = gid("pusher")
        self.object_bodies = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, f"obj{i}")
                              for i in range(N_OBJECT_SLOTS)]
        self.object_geoms = [{s: gid(f"obj{i}_{s}") for s in SHAPES} for i in range(N_OBJECT_SLOTS)]
        joint = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, f"obj{i}")
                 for i in range(N_OBJECT_SLOTS)]
        self.object_qpos = [int(model.jnt_qposadr[j]) for j in joint]
        self.object_qvel = [int(model.jnt_dofadr[j]) for j in joint]
        pj = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in ("pusher_x", "pusher_y")]
        self.pusher_qpos = [int(model.jnt_qposadr[j]) for j in pj]
        self.pusher_qvel = [int(model.jnt_dofadr[j]) for j in pj]
        self.cameras = {name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
                        for name in CAMERAS}
        self.light = 0


_LIVE_RENDERERS: "weakref.WeakSet[Renderer]" = weakref.WeakSet()


def _close_renderers() -> None:
    # GL contexts freed by the garbage collector after EGL has shut down raise errors at exit.
    for renderer in list(_LIVE_RENDERERS):
        renderer.close()


class Renderer:
    """Offscreen rendering of named cameras into uint8 RGB arrays.

    Owns the GL and MuJoCo render contexts, so the table texture can be re-uploaded after a
    perturbation rewrites its pixels (`upload_texture`).
    """

    def __init__(self, model: mujoco.MjModel):
        self.model = model
        self._ctx = None
        try:
            self._gl = mujoco.GLContext(model.vis.global_.offwidth, model.vis.global_.offheight)
            self._gl.make_current()
        except Exception as err:
            raise RuntimeError(
                f"could not open an offscreen OpenGL context ({err}); mujoco picks its GL backend "
                f"when first imported, so import envs before mujoco or set MUJOCO_GL=egl") from err
        if not _LIVE_RENDERERS:
            # The first context registers EGL's own shutdown; ours must run before it (LIFO).
            atexit.unregister(_close_renderers)
            atexit.register(_close_renderers)
        _LIVE_RENDERERS.add(self)
        self._ctx = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._ctx)
        self._scene = mujoco.MjvScene(model, maxgeom=64)
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED

    def render(self, data: mujoco.MjData, camera_id: int, height: int, width: int) -> np.ndarray:
        self._gl.make_current()
        self._camera.fixedcamid = camera_id
        mujoco.mjv_updateScene(self.model, data, self._option, None, self._camera,
                               mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        rect = mujoco.MjrRect(0, 0, width, height)
        mujoco.mjr_render(rect, self._scene, self._ctx)
        out = np.empty((height, width, 3), dtype=np.uint8)
        mujoco.mjr_readPixels(out, None, rect, self._ctx)
        return out[::-1].copy()  # OpenGL rows run bottom-up

    def upload_texture(self, texture_id: int) -> None:
        self._gl.make_current()
        mujoco.mjr_uploadTexture(self.model, self._ctx, texture_id)

    def close(self) -> None:
        if self._ctx is not None:
            self._gl.make_current()
            self._ctx.free()
            self._gl.free()
            self._ctx = None
