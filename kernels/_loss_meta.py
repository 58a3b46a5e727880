"""Host-side plan of a multi-level DreamTeacher loss launch: per-level metadata packed into one int64 tensor.

Kept free of Triton so it can be imported (and unit-tested) anywhere. Row layout (16 int64 per level), shared by
every kernel in ``dreamteacher_loss.py``:

 0 s_off, 1 g_off: element offsets of the level's student/teacher map from its group's base map
 2 B, 3 C, 4 HW, 5 work items (B * n_tiles), 6 first work item within the group, 7 n_tiles (pixel tiles/sample)
 8 pixel-stats offset, 9 tile-partials offset, 10 sample-stats offset (floats), 11 first sample (global)
 12 ds_off (backward: offset of the gradient map from its group's base gradient), 13 first backward work item
 within the group, 14 backward work items (B * n_tiles * channel chunks), 15 group id

Forward work items are ordered longest first within a group (levels by descending C: a program walks all C channels
of its pixel tile), so the long programs do not form the tail of the launch.
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
    s_base: Tensor | None = None
    g_base: Tensor | None = None


@dataclass
class LevelPlan:
    student: list[Tensor]
    teacher: list[Tensor]
    whiten: int
    rows: list[list[int]]
    groups: list[Group]
    pix_size: int = 0
    part_size: int = 0
    samp_size: int = 0
    num_samples: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_levels(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return self.student[0].device

    def set_grad_offsets(self, grads: list[Tensor]) -> None:
        for grp in self.groups:
            base = grads[grp.levels[0]]
            for lvl in grp.levels:
                off = _elem_offset(grads[lvl], base)
                self.rows[lvl][12] = off
                if off % grp.align or grads[lvl].data_ptr() % 16:
                    grp.align = 1

    def meta_tensor(self) -> Tensor:
        """The rows as an int64 tensor on the maps' device (cached: same rows -> same tensor, no new copy)."""
        key = (str(self.device), tuple(tuple(r) for r in self.rows))
        meta = _META_CACHE.pop(key, None)
        if meta is None:
            meta = torch.tensor(self.rows, dtype=torch.int64)
            if self.device.type == "cuda":
                # pinned + non_blocking: no host sync in the training step
                meta = meta.pin_memory().to(self.device, non_blocking=True)
            else:
                meta = meta.to(self.device)
        _META_CACHE[key] = meta
        while len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        return meta


# The rows hold element offsets between maps; the caching allocator tends to hand the same addresses out step after
# step, so a few recent metadata tensors are kept on the device (keyed by their full contents).
_META_CACHE: dict = {}
_META_CACHE_SIZE = 32


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


def build_plan(student: list[Tensor], teacher: list[Tensor], whiten: int) -> LevelPlan:
    """Group levels by (dtype, student layout, teacher layout) and compute every offset of the launch."""
    if student[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtfast.kernels: the Triton loss takes float32/float16/bfloat16 maps, got {student[0].dtype}")
    s_list, g_list, rows, groups = [], [], [], {}
    pix = part = samp = first_sample = 0
    for lvl, (s, g) in enumerate(zip(student, teacher)):
        s, s_cl = layout_of(s)
        g, g_cl = layout_of(g.detach())
        s_list.append(s)
        g_list.append(g)
        B, C, H, W = s.shape
        HW = H * W
        key = (s.dtype, s_cl, g_cl)
        if key not in groups:
            block_c, block_p, unroll, warps, chunk, bwd_rows = tile_config(s_cl, s.element_size())
            groups[key] = Group([], s_cl, g_cl, block_c, block_p, unroll, warps, chunk, bwd_rows,
                                align=16 // s.element_size(), s_base=s, g_base=g)
        grp = groups[key]
        grp.levels.append(lvl)
        n_tiles = -(-HW // grp.block_p)
        s_off, g_off = _elem_offset(s, grp.s_base), _elem_offset(g, grp.g_base)
        if s_off % grp.align or g_off % grp.align or C % grp.align or HW % grp.align \
                or s.data_ptr() % 16 or g.data_ptr() % 16:
            grp.align = 1
        row = [0] * META
        row[0:12] = [s_off, g_off, B, C, HW, B * n_tiles, 0, n_tiles, pix, part, samp, first_sample]
        n_chunks = -(-C // grp.bwd_chunk) if grp.bwd_chunk else 1
        row[13:16] = [grp.num_bwd_items, B * n_tiles * n_chunks, list(groups).index(key)]
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
    return LevelPlan(s_list, g_list, whiten, rows, list(groups.values()), pix_size=pix, part_size=part,
                     samp_size=samp, num_samples=first_sample)
