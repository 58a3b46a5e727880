"""Host-side plan of a multi-level DreamTeacher loss launch: per-level metadata packed into one int64 tensor.

Kept free of Triton so it can be imported (and unit-tested) anywhere. Row layout (16 int64 per level), shared by
every kernel in ``dreamteacher_loss.py``:

 0 s_off, 1 g_off: element offsets of the level's student/teacher map from its group's base map
 2 B, 3 C, 4 HW, 5 work items (B * n_tiles), 6 first work item within the group, 7 n_tiles (pixel tiles/sample)
 8 pixel-stats offset, 9 tile-partials offset, 10 sample-stats offset (floats), 11 first sample (global)
 12 ds_off (backward: offset of the gradient map from its group's base gradient; in the plan, its offset in the
 group's flat gradient buffer), 13 first backward work item within the group, 14 backward work items
 (B * n_tiles * channel chunks), 15 group id

Forward work items are ordered longest first within a group (levels by descending C: a program walks all C channels
of its pixel tile), so the long programs do not form the tail of the launch.

Host cost: ``prepare`` caches plans (rows, groups, the device metadata tensor, autotuning keys) by the maps'
addresses, shapes, layouts and dtypes, so a training step that sees the same buffers again builds nothing and
copies nothing to the device. The eager backward allocates each group's gradients as views into one flat buffer
(``LevelPlan.flat_grads``) at offsets fixed by the shapes, so its metadata is the forward's: no per-step rows, no
pinned staging copy, whatever addresses the allocator hands out for the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

META = 16
PIX_PLANES = {0: 4, 1: 2}  # channel: q_s, q_g, mu, rstd per pixel; sample: q_s, q_g
PART_PLANES = {0: 1, 1: 6}  # channel: sum of squared errors per tile; sample: n, mean_g, M2_g, mean_s, C_sg, S_ss
SAMPLE_STATS = 8  # mse_b, at_b, ||q_s||, ||q_g||, ||d||, <qhat_s, d>, mu_b, rstd_b
NUM_WARPS = 4  # channels_last kernels (and the default of aot_check)
NCHW_WARPS = 4


def tile_config(channels_last: bool, element_size: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_C, BLOCK_P, UNROLL, num_warps, BWD_CHUNK, BWD_ROWS) of the main kernels for a student layout.

    NCHW (as the CUDA C++ column kernel): a forward program owns BLOCK_P = 128 contiguous pixels and walks the
    channels in [BLOCK_C, BLOCK_P] = [8, 128] tiles (4 warps: 8 elements = 16 (16-bit) or 32 (fp32) bytes per thread
    and map), UNROLL tiles per iteration with every load issued before the arithmetic (16-bit: 4 tiles = 128 bytes in
    flight per thread; fp32: 2), into per-element fp32 accumulators (48 registers) reduced over the rows once at the
    end. Backward (no reduction over C): a program covers BWD_CHUNK channels of a pixel tile in [BWD_ROWS, BLOCK_P]
    tiles, so the grid has many equal, short programs (~64-128 KiB moved each).
    channels_last: one pixel per thread, BLOCK_C = 32 contiguous bytes of channels, UNROLL chunks per iteration.
    """
    if channels_last:
        return 32 // element_size, 32 * NUM_WARPS, 2, NUM_WARPS, 0, 1
    return 8, 128, 4 if element_size < 4 else 2, NCHW_WARPS, 128, 32


def layout_of(x: Tensor) -> tuple[Tensor, bool]:
    """(map, is_channels_last): NCHW-contiguous maps go as they are, channels_last ones too; others are copied."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


@dataclass
class Group:
    levels: list[int]
    s_cl: bool
    g_cl: bool
    block_c: int
    block_p: int
    unroll: int
    num_warps: int = NUM_WARPS
    bwd_chunk: int = 0
    bwd_rows: int = 1
    align: int = 1
    num_items: int = 0
    num_bwd_items: int = 0
    dtype: torch.dtype = torch.float32
    grad_size: int = 0  # elements of the group's flat gradient buffer (levels at row[12], GRAD_ALIGN_BYTES apart)
    tune_key: int = 0  # autotuning key of the NCHW kernels: the levels' (B, C, HW) and the dtype


@dataclass
class LevelPlan:
    """Everything about a launch that depends only on the maps' addresses, shapes, layouts and dtypes (no tensors
    are held: plans are cached and reused across calls, see ``prepare``). A group's base maps are the processed maps
    of its first level (``groups[i].levels[0]``)."""

    whiten: int
    rows: list[list[int]]
    groups: list[Group]
    device: torch.device
    pix_size: int = 0
    part_size: int = 0
    samp_size: int = 0
    num_samples: int = 0
    grad_views: list[tuple[int, tuple, tuple, int]] = field(default_factory=list)  # (group, shape, strides, offset)
    meta: Tensor | None = None
    extra: dict = field(default_factory=dict)  # launch arguments memoised by the kernel module

    @property
    def num_levels(self) -> int:
        return len(self.rows)

    def meta_tensor(self) -> Tensor:
        """The rows as an int64 tensor on the plan's device (made once per plan; row 12 = flat-gradient offsets)."""
        if self.meta is None:
            self.meta = meta_tensor(self.rows, self.device)
        return self.meta

    def flat_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """(one flat buffer per group, the level gradients as views into them): offsets match ``meta_tensor()``."""
        flats = [torch.empty(grp.grad_size, dtype=grp.dtype, device=self.device) for grp in self.groups]
        grads = [flats[gid].as_strided(shape, strides, offset) for gid, shape, strides, offset in self.grad_views]
        return flats, grads

    def grad_meta(self, grads: list[Tensor]) -> tuple[Tensor, list[int]]:
        """(metadata, backward ALIGN per group) for gradient maps allocated separately (offsets from each group's
        first gradient; cached by content, as the caching allocator hands the same addresses out step after step)."""
        rows = [list(r) for r in self.rows]
        aligns = []
        for grp in self.groups:
            base = grads[grp.levels[0]]
            align = grp.align
            for lvl in grp.levels:
                off = _elem_offset(grads[lvl], base)
                rows[lvl][12] = off
                if off % align or grads[lvl].data_ptr() % 16:
                    align = 1
            aligns.append(align)
        return meta_tensor(rows, self.device), aligns


def meta_tensor(rows: list[list[int]], device: torch.device) -> Tensor:
    """Rows as an int64 tensor on ``device``, cached by content (same rows -> the same tensor, no new copy)."""
    key = (device, tuple(tuple(r) for r in rows))
    meta = _META_CACHE.pop(key, None)
    if meta is None:
        STATS["meta_builds"] += 1
        meta = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            # pinned + non_blocking: no host sync in the training step (pinned blocks are recycled by torch's
            # caching host allocator; with plans cached this runs once per new set of addresses, not per step)
            meta = meta.pin_memory().to(device, non_blocking=True)
        else:
            meta = meta.to(device)
    _META_CACHE[key] = meta
    while len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.pop(next(iter(_META_CACHE)))
    return meta


# Metadata tensors of separately allocated gradients (the custom-op path), keyed by their full contents.
_META_CACHE: dict = {}
_META_CACHE_SIZE = 32
# Plans keyed by the processed maps' (address, shape, layout, dtype) per level, device and whiten; least recently used
# dropped first. A hit is exact: the rows are a function of the key, so reused addresses with new tensors are fine.
_PLAN_CACHE: dict = {}
PLAN_CACHE_SIZE = 64
STATS = {"plan_hits": 0, "plan_builds": 0, "meta_builds": 0}  # counters, read by benchmarks/loss_bench --profile
GRAD_ALIGN_BYTES = 128  # levels of a flat gradient buffer start on 128-byte boundaries


def _elem_offset(x: Tensor, base: Tensor) -> int:
    diff = x.data_ptr() - base.data_ptr()
    if diff % x.element_size():
        raise RuntimeError("dtfast.kernels: map addresses are not element-aligned")
    return diff // x.element_size()


def saved_sizes(shapes: list[tuple[int, int, int, int]], whiten: int) -> tuple[int, int]:
    """Numbers of floats in (pixel_stats, sample_stats) for maps of these (B, C, H, W) shapes."""
    pix = sum(PIX_PLANES[whiten] * b * h * w for b, _, h, w in shapes)
    samp = sum(SAMPLE_STATS * b for b, _, _, _ in shapes)
    return pix, samp


def prepare(student: list[Tensor], teacher: list[Tensor], whiten: int
            ) -> tuple[LevelPlan, list[Tensor], list[Tensor]]:
    """(plan, processed student maps, processed teacher maps): maps in a layout the kernels take (copied once with
    ``.contiguous()`` otherwise) and the launch plan, from the plan cache when the same addresses, shapes, layouts
    and dtypes come again."""
    s_list, g_list, key = [], [], [whiten]
    for s, g in zip(student, teacher):
        s, s_cl = layout_of(s)
        g, g_cl = layout_of(g)
        s_list.append(s)
        g_list.append(g)
        key.append((s.data_ptr(), g.data_ptr(), s.shape, s_cl, g_cl, s.dtype, g.dtype))
    key.append(s_list[0].device)
    key = tuple(key)
    plan = _PLAN_CACHE.pop(key, None)
    if plan is None:
        plan = build_plan(s_list, g_list, whiten)
        STATS["plan_builds"] += 1
    else:
        STATS["plan_hits"] += 1
    _PLAN_CACHE[key] = plan  # most recent last
    while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    return plan, s_list, g_list


def clear_caches() -> None:
    _PLAN_CACHE.clear()
    _META_CACHE.clear()


def build_plan(student: list[Tensor], teacher: list[Tensor], whiten: int) -> LevelPlan:
    """Group levels by (dtype, student layout, teacher layout) and compute every offset of the launch.

    Takes the processed maps (NCHW- or channels_last-contiguous: ``prepare`` makes them so)."""
    if student[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtfast.kernels: the Triton loss takes float32/float16/bfloat16 maps, got {student[0].dtype}")
    rows, groups, bases, grad_views = [], {}, {}, []
    pix = part = samp = first_sample = 0
    for lvl, (s, g) in enumerate(zip(student, teacher)):
        (s2, s_cl), (g2, g_cl) = layout_of(s), layout_of(g)
        if s2 is not s or g2 is not g:
            raise ValueError("dtfast.kernels.build_plan: maps must be NCHW- or channels_last-contiguous (prepare())")
        B, C, H, W = s.shape
        HW = H * W
        key = (s.dtype, s_cl, g_cl)
        esize = s.element_size()
        if key not in groups:
            block_c, block_p, unroll, warps, chunk, bwd_rows = tile_config(s_cl, esize)
            groups[key] = Group([], s_cl, g_cl, block_c, block_p, unroll, warps, chunk, bwd_rows,
                                align=16 // esize, dtype=s.dtype)
            bases[key] = (s, g)
        grp = groups[key]
        gid = list(groups).index(key)
        grp.levels.append(lvl)
        n_tiles = -(-HW // grp.block_p)
        s_off, g_off = _elem_offset(s, bases[key][0]), _elem_offset(g, bases[key][1])
        if s_off % grp.align or g_off % grp.align or C % grp.align or HW % grp.align \
                or s.data_ptr() % 16 or g.data_ptr() % 16:
            grp.align = 1
        ds_off = grp.grad_size
        grp.grad_size += -(-B * C * HW * esize // GRAD_ALIGN_BYTES) * GRAD_ALIGN_BYTES // esize
        strides = (C * HW, 1, W * C, C) if s_cl else (C * HW, HW, W, 1)
        grad_views.append((gid, (B, C, H, W), strides, ds_off))
        row = [0] * META
        row[0:12] = [s_off, g_off, B, C, HW, B * n_tiles, 0, n_tiles, pix, part, samp, first_sample]
        n_chunks = -(-C // grp.bwd_chunk) if grp.bwd_chunk else 1
        row[12:16] = [ds_off, grp.num_bwd_items, B * n_tiles * n_chunks, gid]
        rows.append(row)
        grp.num_items += B * n_tiles
        grp.num_bwd_items += B * n_tiles * n_chunks
        pix += PIX_PLANES[whiten] * B * HW
        part += PART_PLANES[whiten] * B * n_tiles
        samp += SAMPLE_STATS * B
        first_sample += B
    for grp in groups.values():  # forward work items: longest programs (largest C) first
        start = 0
        for lvl in sorted(grp.levels, key=lambda i: -rows[i][3]):
            rows[lvl][6] = start
            start += rows[lvl][5]
        shapes = tuple((rows[lvl][2], rows[lvl][3], rows[lvl][4]) for lvl in grp.levels)
        grp.tune_key = hash((str(grp.dtype), shapes)) % (2**31 - 1)
    return LevelPlan(whiten, rows, list(groups.values()), student[0].device, pix_size=pix, part_size=part,
                     samp_size=samp, num_samples=first_sample, grad_views=grad_views)
