"""Weight quantizers: a float matrix in, the compressed tensors of one stored module out.

Stored layouts (the runtime modules in ``modeling/quantized.py`` read them as they are):

* ``int8``: ``qweight`` int8 [N, K], symmetric per output channel; ``scales`` bf16 [N].
* ``int4``: ``qweight`` uint8 [Npad, K/2] in the layout of torch's CPU int4 kernel
  (``torch._convert_weight_to_int4pack_for_cpu``: blocks of 64 rows, byte ``k * 32 + j`` of a
  block holds row ``j`` in its low nibble and row ``j + 32`` in its high nibble);
  ``scales_zeros`` bf16 [K/G, Npad, 2] with w = (q - 8) * scale + zero, asymmetric per group
  of G input columns. Npad is N rounded up to 64 (padding rows are zero).
* ``int2``: ``qweight`` uint8 [N, K/4] (four 2-bit codes per byte, lowest bits first);
  ``scales_zeros`` bf16 [K/G, N, 2] with w = (q - 2) * scale + zero.
* ``nf4``: ``qweight`` uint8 [N, K/2] (NF4 code indices, low nibble first), ``absmax`` f32
  [N, K/G]: w = NF4[q] * absmax, the block-wise NormalFloat4 of QLoRA / bitsandbytes.

Scales and zeros are rounded to bf16 before the codes are chosen, so the stored
(codes, scale, zero) triple reproduces exactly what was measured offline.
"""

from __future__ import annotations

import torch

INT4_BLOCK_N = 64
ROW_CHUNK = 8192
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# least-squares refits of each group's scale and zero after the clipping search (gemma3:270m,
# embedding table alone in int4 g32: perplexity +5.6% with none, +4.3% with one, +3.4% with
# two, +3.4% with four; measured in one run on benchmarks/data/heldout.txt)
REFIT_STEPS = 2

# QLoRA's NormalFloat4 code book (quantiles of N(0, 1), rescaled to [-1, 1]).
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


# ------------------------------------------------------------------------------ int8


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8. weight: [N, K]."""
    w = weight.detach().float()
    scales = _bf16((w.abs().amax(dim=1) / 127.0).clamp(min=1e-10))  # [N]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q.contiguous(), "scales": scales.to(torch.bfloat16)}


def dequantize_int8(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["qweight"].float() * t["scales"].float()[:, None]


INT8_BLOCK_N = 64  # rows per block of the CPU kernel's runtime layout
INT8_BLOCK_K = 32  # its columns are padded to a multiple of this (one activation block)


def block_int8(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [Npad / 64, Kp / 4, 64, 4]: the CPU kernel's runtime layout (for each
    group of 4 columns, the 64 rows' 4 weights side by side; padding rows and columns
    zero, Kp a multiple of 32). Not a stored format."""
    n, k = qweight.shape
    npad = -(-n // INT8_BLOCK_N) * INT8_BLOCK_N
    kpad = -(-k // INT8_BLOCK_K) * INT8_BLOCK_K
    padded = qweight
    if (npad, kpad) != (n, k):
        padded = torch.zeros((npad, kpad), dtype=qweight.dtype, device=qweight.device)
        padded[:n, :k] = qweight
    blocks = padded.view(npad // INT8_BLOCK_N, INT8_BLOCK_N, kpad // 4, 4)
    return blocks.permute(0, 2, 1, 3).contiguous()


def unblock_int8(blocked: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    nb, groups, _, _ = blocked.shape
    rows = blocked.permute(0, 2, 1, 3).reshape(nb * INT8_BLOCK_N, groups * 4)
    return rows[:out_features, :in_features].contiguous()


def blocked_int8_rows(blocked: torch.Tensor, ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows ``ids`` of a blocked int8 weight as [*ids.shape, K] (an embedding lookup)."""
    picked = blocked[ids // INT8_BLOCK_N, :, ids % INT8_BLOCK_N]  # [..., Kp / 4, 4]
    return picked.flatten(-2)[..., :in_features]


# ------------------------------------------------------------------------------ group-wise


def group_params(
    w: torch.Tensor, levels: int, group_size: int, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row chunks of :func:`_group_params_chunk` (bounded memory for embedding tables)."""
    parts = [
        _group_params_chunk(w[i : i + ROW_CHUNK], levels, group_size, importance)
        for i in range(0, w.shape[0], ROW_CHUNK)
    ]
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
    )


def _group_params_chunk(
    w: torch.Tensor, levels: int, group_size: int, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group (codes, scale, zero) minimising the (importance-weighted)
    squared error over a few clipping ratios, then refined by least-squares refits.
    w: [N, K] -> codes [N, K] int32 in [0, levels - 1], scale / zero [N, K/G] float
    (bf16-exact); w ~ (q - mid) * s + z."""
    n, k = w.shape
    mid = levels // 2
    wg = w.reshape(n, k // group_size, group_size)  # [N, K/G, G]
    weight = (
        importance.float().reshape(1, k // group_size, group_size)
        if importance is not None
        else torch.ones(1, 1, 1)
    )
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, K/G]
    best_err = torch.full(lo.shape, float("inf"))
    best_q = torch.zeros(wg.shape, dtype=torch.int32)
    best_s = torch.zeros(lo.shape)
    best_z = torch.zeros(lo.shape)

    def consider(scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Rounds every group with this scale / zero and keeps it where the error falls."""
        nonlocal best_err, best_q, best_s, best_z
        q = torch.clamp(torch.round((wg - zero[..., None]) / scale[..., None]) + mid, 0, levels - 1)
        err = (((q - mid) * scale[..., None] + zero[..., None] - wg) ** 2 * weight).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q.to(torch.int32), best_q)
        best_s = torch.where(better, scale, best_s)
        best_z = torch.where(better, zero, best_z)

    for ratio in CLIP_RATIOS:
        cl, ch = lo * ratio, hi * ratio
        scale = _bf16(((ch - cl) / (levels - 1)).clamp(min=1e-10))
        consider(scale, _bf16(cl + mid * scale))
    for _ in range(REFIT_STEPS):
        # Given the codes, the (weighted) least-squares scale and zero of each group have a
        # closed form; re-round with them and keep whichever is better, group by group.
        x = best_q.float() - mid  # [N, K/G, G]
        wt = weight.expand_as(x)
        sw, sx, sxx = wt.sum(-1), (wt * x).sum(-1), (wt * x * x).sum(-1)
        sy, sxy = (wt * wg).sum(-1), (wt * x * wg).sum(-1)
        det = sw * sxx - sx * sx
        fit = det > 1e-12 * sw * sw
        scale = (sw * sxy - sx * sy) / torch.where(fit, det, torch.ones_like(det))
        fit &= scale > 0
        scale = _bf16(torch.where(fit, scale, best_s))
        consider(scale, _bf16(torch.where(fit, (sy - scale * sx) / sw.clamp(min=1e-30), best_z)))
    return best_q.reshape(n, k), best_s, best_z


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """codes int32 [N, K] in [0, 15] -> uint8 [Npad, K/2] in the CPU int4 kernel's layout."""
    n, k = codes.shape
    npad = -(-n // INT4_BLOCK_N) * INT4_BLOCK_N
    padded = torch.zeros(npad, k, dtype=torch.int32)
    padded[:n] = codes
    blocks = padded.reshape(npad // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, k)
    packed = (blocks[:, 0] | (blocks[:, 1] << 4)).permute(0, 2, 1)  # [nb, K, 32]
    return packed.contiguous().to(torch.uint8).reshape(npad, k // 2)


_TORCH_LAYOUT: list[bool] = []


def torch_cpu_int4_layout() -> bool:
    """True when torch's CPU int4 kernel on this CPU reads the stored layout (it packs 64-row
    blocks with AVX512 and 32-row blocks with AVX2: the kernel follows the CPU)."""
    if not _TORCH_LAYOUT:
        codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0))
        codes = codes.to(torch.int32)
        try:
            theirs = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            _TORCH_LAYOUT.append(bool(torch.equal(theirs, pack_int4_cpu(codes))))
        except Exception:  # no CPU int4 kernel in this torch build
            _TORCH_LAYOUT.append(False)
    return _TORCH_LAYOUT[0]


def unpack_int4_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The codes of ``rows`` (int64 [R]) from a kernel-layout tensor -> uint8 [R, K]."""
    npad, half = packed.shape
    k = half * 2
    blocks = packed.view(npad // INT4_BLOCK_N, k, INT4_BLOCK_N // 2)  # [nb, K, 32]
    lane = rows % INT4_BLOCK_N
    raw = blocks[rows // INT4_BLOCK_N, :, lane % (INT4_BLOCK_N // 2)]  # [R, K]
    high = (lane >= INT4_BLOCK_N // 2)[:, None]
    return torch.where(high, raw >> 4, raw & 0xF)


def block_int4(packed: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The stored int4 layout [Npad, K/2] -> the CPU integer kernel's [Npad / 64, K / 8,
    64, 4]: per chunk of 8 columns, each row's codes in 4 bytes (byte t: column 8c + t in
    the low nibble, 8c + 4 + t in the high one). Not a stored format."""
    npad, half = packed.shape
    k = half * 2
    out = torch.empty((npad, k // 8, 4), dtype=torch.uint8, device=packed.device)
    for start in range(0, npad, chunk):  # in row chunks: a vocabulary-sized head is big
        rows = torch.arange(start, min(start + chunk, npad), device=packed.device)
        codes = unpack_int4_rows(packed, rows).view(len(rows), k // 8, 2, 4)
        out[start : start + len(rows)] = codes[:, :, 0] | (codes[:, :, 1] << 4)
    blocks = out.view(npad // INT4_BLOCK_N, INT4_BLOCK_N, k // 8, 4)
    return blocks.permute(0, 2, 1, 3).contiguous()


def unblock_int4(blocked: torch.Tensor) -> torch.Tensor:
    """block_int4's inverse: the stored layout back."""
    nb, chunks, _, _ = blocked.shape
    rows = blocked.permute(0, 2, 1, 3).reshape(nb * INT4_BLOCK_N, chunks, 4)
    codes = torch.stack([rows & 0xF, rows >> 4], dim=2).reshape(nb * INT4_BLOCK_N, chunks * 8)
    return pack_int4_cpu(codes.to(torch.int32))


def quantize_int4(
    weight: torch.Tensor, group_size: int = 32, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Asymmetric group-wise int4 (round to nearest). weight: [N, K], G divides K."""
    codes, scale, zero = group_params(weight.detach().float(), 16, group_size, importance)
    return pack_int4(codes, scale, zero)


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict:
    """Stored int4 tensors from codes [N, K] in [0, 15] and scale / zero [N, K/G]."""
    n = codes.shape[0]
    npad = -(-n // INT4_BLOCK_N) * INT4_BLOCK_N
    sz = torch.zeros(npad, scale.shape[1], 2)
    sz[:n, :, 0], sz[:n, :, 1] = scale, zero
    return {
        "qweight": pack_int4_cpu(codes.to(torch.int32)),
        "scales_zeros": sz.transpose(0, 1).contiguous().to(torch.bfloat16),  # [K/G, Npad, 2]
    }


def dequantize_int4(t: dict[str, torch.Tensor], out_features: int) -> torch.Tensor:
    packed, sz = t["qweight"], t["scales_zeros"].float()
    _npad, half = packed.shape
    group = half * 2 // sz.shape[0]
    codes = unpack_int4_rows(packed, torch.arange(out_features)).float()  # [N, K]
    scale = sz[:, :out_features, 0].t().repeat_interleave(group, dim=1)
    zero = sz[:, :out_features, 1].t().repeat_interleave(group, dim=1)
    return (codes - 8) * scale + zero


def quantize_int2(
    weight: torch.Tensor, group_size: int = 32, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    codes, scale, zero = group_params(weight.detach().float(), 4, group_size, importance)
    return pack_int2(codes, scale, zero)


def pack_int2(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict:
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // 4, 4)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return {
        "qweight": packed.to(torch.uint8).contiguous(),
        "scales_zeros": torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16(),
    }


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/4] -> int32 codes [N, K] in [0, 3]."""
    p = packed.to(torch.int32)
    return torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(p.shape[0], -1)


def dequantize_int2(t: dict[str, torch.Tensor]) -> torch.Tensor:
    codes = unpack_int2(t["qweight"]).float()
    sz = t["scales_zeros"].float()
    group = codes.shape[1] // sz.shape[0]
    scale = sz[..., 0].t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].t().repeat_interleave(group, dim=1)
    return (codes - 2) * scale + zero


def int2_as_int4(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact re-expression of int2 codes in the int4 kernel layout (q4 = q2 + 6, same scale
    and zero), so int2 weights run on the int4 kernel instead of being dequantized."""
    codes = unpack_int2(t["qweight"]) + 6
    n = codes.shape[0]
    npad = -(-n // INT4_BLOCK_N) * INT4_BLOCK_N
    sz = torch.zeros(t["scales_zeros"].shape[0], npad, 2, dtype=torch.bfloat16)
    sz[:, :n] = t["scales_zeros"]
    return {"qweight": pack_int4_cpu(codes), "scales_zeros": sz}


# ------------------------------------------------------------------------------ nf4


def quantize_nf4(weight: torch.Tensor, group_size: int = 64) -> dict[str, torch.Tensor]:
    w = weight.detach().float()
    n, k = w.shape
    codes = torch.tensor(NF4_CODES)
    bounds = (codes[1:] + codes[:-1]) / 2  # nearest code = number of midpoints below
    absmax = w.reshape(n, k // group_size, group_size).abs().amax(dim=-1).clamp(min=1e-10)
    idx = torch.empty(n, k, dtype=torch.int32)
    for i in range(0, n, ROW_CHUNK):  # bounded memory for embedding tables
        rows = w[i : i + ROW_CHUNK].reshape(-1, k // group_size, group_size)
        normed = rows / absmax[i : i + ROW_CHUNK, :, None]
        idx[i : i + ROW_CHUNK] = torch.bucketize(normed, bounds).reshape(-1, k).to(torch.int32)
    packed = (idx[:, ::2] | (idx[:, 1::2] << 4)).to(torch.uint8)
    return {"qweight": packed.contiguous(), "absmax": absmax.contiguous()}


def dequantize_nf4(t: dict[str, torch.Tensor]) -> torch.Tensor:
    packed = t["qweight"]
    idx = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    w = torch.tensor(NF4_CODES)[idx]
    absmax = t["absmax"].float()
    group = w.shape[1] // absmax.shape[1]
    return w * absmax.repeat_interleave(group, dim=1)
