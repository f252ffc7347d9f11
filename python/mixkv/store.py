"""The flattened varlen KV store of one layer (SPEC §8) and decode attention over it.

Segment s = b * Hkv + h holds the kept tokens of sequence b, kv head h in rows
``offsets[s] .. offsets[s] + lengths[s] - 1`` of one K and one V buffer ``[slots, D]``. Every
segment has a reservation (``capacity``) so that decoding appends in place; when a reservation
would overflow, all reservations double at once (one copy kernel). Offsets, lengths and
capacities are mirrored on the host, so decode steps never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from mixkv import _backends, _core
from mixkv._checks import (
    FLOAT_DTYPES,
    check_int,
    check_last_dim_contiguous,
    check_same_device,
    check_tensor,
    check_valid_lengths,
)
from mixkv._runtime import call, stream_handle, to_device_async, workspace

DEFAULT_RESERVE: int = 128
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def _offsets_of(capacities: np.ndarray) -> np.ndarray:
    offsets = np.zeros_like(capacities)
    if capacities.size > 1:
        np.cumsum(capacities[:-1], out=offsets[1:])
    return offsets


def _check_kv(kname: str, k: object, vname: str, v: object) -> tuple[torch.Tensor, torch.Tensor]:
    kt = check_last_dim_contiguous(kname, check_tensor(kname, k, ndim=4, dtypes=FLOAT_DTYPES))
    vt = check_last_dim_contiguous(vname, check_tensor(vname, v, ndim=4, dtypes=FLOAT_DTYPES))
    if vt.shape != kt.shape:
        raise ValueError(f"{vname} must have the shape of {kname} {tuple(kt.shape)}, got {tuple(vt.shape)}")
    if vt.dtype != kt.dtype:
        raise TypeError(f"{vname} must have the dtype of {kname} ({kt.dtype}), got {vt.dtype}")
    check_same_device(**{kname: kt, vname: vt})
    return kt, vt


class VarlenKVStore:
    """K/V of one layer as variable-length segments per (sequence, kv head), appendable in place."""

    def __init__(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        lengths: torch.Tensor,
        host_offsets: np.ndarray,
        host_capacities: np.ndarray,
        host_lengths: np.ndarray,
        batch_size: int,
        num_kv_heads: int,
    ) -> None:
        """Internal: use :meth:`from_selection`. Buffers and the host mirrors must agree."""
        self._k = k_buf
        self._v = v_buf
        self._lengths = lengths
        self._host_offsets = host_offsets.astype(np.int64)
        self._host_caps = host_capacities.astype(np.int64)
        self._host_lengths = host_lengths.astype(np.int64)
        self._offsets = to_device_async(torch.from_numpy(self._host_offsets.astype(np.int32)), k_buf.device)
        self._batch = batch_size
        self._hkv = num_kv_heads
        self._device = k_buf.device
        self._dtype = k_buf.dtype
        self._dim = int(k_buf.shape[1])
        self._refresh()

    def _refresh(self) -> None:
        """Recompute the host scalars the decode hot path reads (after any change of the mirrors)."""
        self._max_len = int(self._host_lengths.max(initial=0))
        self._total = int(self._host_lengths.sum())
        self._room = int((self._host_caps - self._host_lengths).min()) if self._host_caps.size else 0

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_selection(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        counts: torch.Tensor,
        window: int,
        reserve: int | None = None,
        valid_lengths: torch.Tensor | None = None,
        *,
        validate: bool = True,
    ) -> VarlenKVStore:
        """Gather, per (b, h), the ``counts[b, h]`` selected prefix positions and the window tokens.

        keys/values ``[B, Hkv, N, D]``; positions int ``[B, Hkv, C]`` ascending, -1 padded (entries
        past ``counts`` are ignored); counts int ``[B, Hkv]``; window: the last ``window`` valid
        tokens are always kept; reserve: headroom tokens per segment for appends (default 128);
        valid_lengths int ``[B]``: valid tokens of a left-padded sequence b are N - n_b .. N - 1.
        Reads ``counts`` and ``valid_lengths`` on the host (one synchronisation). ``validate=False``
        skips the checks that read positions and the valid_lengths range (each another
        synchronisation), for callers whose positions come from :func:`mixkv.ops.select` over
        the same valid lengths; the counts range is still checked (on the host copy).
        """
        k, v = _check_kv("keys", keys, "values", values)
        b, hkv, n, d = k.shape
        if b < 1 or hkv < 1 or n < 1 or d < 1:
            raise ValueError(f"keys must have non-empty dimensions [B, Hkv, N, D], got {tuple(k.shape)}")
        pos = check_tensor("positions", positions, ndim=3, dtypes=INDEX_DTYPES)
        cnt = check_tensor("counts", counts, ndim=2, dtypes=INDEX_DTYPES)
        if pos.shape[:2] != (b, hkv):
            raise ValueError(f"positions must have shape [{b}, {hkv}, C], got {tuple(pos.shape)}")
        if cnt.shape != (b, hkv):
            raise ValueError(f"counts must have shape [{b}, {hkv}], got {tuple(cnt.shape)}")
        device = check_same_device(keys=k, positions=pos, counts=cnt)
        window = check_int("window", window, minimum=0)
        reserve = DEFAULT_RESERVE if reserve is None else check_int("reserve", reserve, minimum=0)
        valid = check_valid_lengths(valid_lengths, b, n, device, read_values=validate)

        cap_c = pos.shape[2]
        # counts and valid lengths reach the host in one transfer
        packed = cnt.reshape(-1).to(torch.int64)
        if valid is not None:
            packed = torch.cat([packed, valid.to(torch.int64)])
        host = packed.cpu().numpy()
        host_counts = host[: b * hkv].reshape(b, hkv)
        host_valid = host[b * hkv :] if valid is not None else np.full(b, n, dtype=np.int64)
        if host_counts.min(initial=0) < 0 or host_counts.max(initial=0) > cap_c:
            raise ValueError(f"counts must lie in [0, {cap_c}] (the last dimension of positions)")
        if validate and cap_c > 0:
            nb = valid.to(torch.int64) if valid is not None else torch.full((b,), n, dtype=torch.int64, device=device)
            wstart = torch.maximum(n - torch.full_like(nb, window), n - nb)  # [B]
            p = pos.to(torch.int64)
            used = torch.arange(cap_c, device=device) < cnt.to(torch.int64).unsqueeze(-1)
            inside = (p >= (n - nb).view(b, 1, 1)) & (p < wstart.view(b, 1, 1))
            if not bool((inside | ~used).all()):
                raise ValueError(
                    "positions out of range: every used entry must be a valid prefix position "
                    "(in [N - valid_length, N - window) of its sequence)"
                )
            if cap_c > 1:
                rising = (p[..., 1:] > p[..., :-1]) | ~used[..., 1:]
                if not bool(rising.all()):
                    raise ValueError("positions must be strictly ascending within counts for every (b, h)")
        host_window = np.minimum(np.minimum(host_valid, window), n).astype(np.int64)  # [B]: n - wstart
        host_lengths = (host_counts + host_window[:, None]).reshape(-1)
        caps = host_lengths + reserve
        offsets = _offsets_of(caps)
        slots = int(caps.sum())
        if offsets.size and int(offsets[-1] + caps[-1]) >= 2**31:
            raise ValueError(f"the store would need {slots} slots, more than int32 offsets can address")
        k_buf = torch.empty((slots, d), dtype=k.dtype, device=device)
        v_buf = torch.empty((slots, d), dtype=k.dtype, device=device)
        lengths = torch.empty(b * hkv, dtype=torch.int32, device=device)
        store = cls(k_buf, v_buf, lengths, offsets, caps, host_lengths, b, hkv)
        call(
            _core.store_build,
            k,
            v,
            pos.to(torch.int32).contiguous(),
            cnt.to(torch.int32).contiguous(),
            valid,
            window,
            store._offsets,
            k_buf,
            v_buf,
            lengths,
            stream_handle(device),
        )
        return store

    # ---- decode ---------------------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append T tokens ``[B, Hkv, T, D]`` to every segment (in place; grows when needed)."""
        # Fast path of the checks below (same acceptance): plain tensors of the store's shape,
        # dtype and device with a contiguous last dimension.
        if (
            type(k) is torch.Tensor
            and type(v) is torch.Tensor
            and k.dim() == 4
            and k.shape == v.shape
            and k.dtype is self._dtype
            and v.dtype is self._dtype
            and k.shape[0] == self._batch
            and k.shape[1] == self._hkv
            and k.shape[3] == self._dim
            and k.shape[2] >= 1
            and (self._dim == 1 or (k.stride(3) == 1 and v.stride(3) == 1))
            and k.device == self._device
            and v.device == self._device
        ):
            t = k.shape[2]
            if t > self._room:
                self._grow(t)
            stream = stream_handle(self._device)
            call(_core.store_append, k, v, self._offsets, self._lengths, self._k, self._v, stream)
            self._host_lengths += t
            self._max_len += t
            self._total += t * self._host_lengths.size
            self._room -= t
            return
        kt, vt = _check_kv("k", k, "v", v)
        b, hkv, t, d = kt.shape
        if (b, hkv, d) != (self._batch, self._hkv, self.head_dim) or t < 1:
            raise ValueError(
                f"k must have shape [{self._batch}, {self._hkv}, T >= 1, {self.head_dim}], got {tuple(kt.shape)}"
            )
        if kt.dtype != self.dtype:
            raise TypeError(f"k must have the store's dtype {self.dtype}, got {kt.dtype}")
        if kt.device != self.device:
            raise ValueError(f"k is on {kt.device} but the store is on {self.device}")
        if t > self._room:
            self._grow(t)
        stream = stream_handle(self._device)
        call(_core.store_append, kt, vt, self._offsets, self._lengths, self._k, self._v, stream)
        self._host_lengths += t
        self._refresh()

    def append_attend(
        self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """One decode step: :meth:`append` of ``k``/``v`` ``[B, Hkv, T, D]``, then :meth:`attend` of their
        queries ``q`` ``[B, Hq, T, D]`` with the own kernel, in one core call. Returns ``[B, T, Hq, D]``
        (contiguous: the layout an attention module returns). ``scale`` as in :meth:`attend`
        (default 1/sqrt(D)).

        The hot path of a cache layer: the core checks every argument, before anything changes, and
        raises ValueError naming it (``k_new``, ``v_new``, ``q``, ...); Python checks only what it
        reads or what the core cannot name (tensors of rank 4 of the store's dtype, q's T that of k),
        raising the errors of :meth:`append` and :meth:`attend`.
        """
        if not (
            type(k) is torch.Tensor
            and type(v) is torch.Tensor
            and type(q) is torch.Tensor
            and k.dim() == 4
            and q.dim() == 4
            and k.dtype is self._dtype
            and q.dtype is self._dtype
            and q.shape[2] == k.shape[2]
            and (scale is None or (type(scale) is float and scale != 0.0))
        ):
            self._check_step(k, v, q, scale)
        t = k.shape[2]
        if t > self._room:
            self._grow(t)
        b, hq, tq, d = q.shape
        out = torch.empty((b, tq, hq, d), dtype=q.dtype, device=q.device)
        max_len = self._max_len + t
        total = self._total + t * self._host_lengths.size
        ws = None
        stream = 0
        if self._device.type == "cuda":
            ws = workspace(_core.attend_workspace_bytes(b, hq, tq, d, max_len), self._device)
            stream = stream_handle(self._device)
        _core.store_append_attend(
            to_dlpack(k),
            to_dlpack(v),
            to_dlpack(q),
            to_dlpack(self._offsets),
            to_dlpack(self._lengths),
            to_dlpack(self._k),
            to_dlpack(self._v),
            max_len,
            0.0 if scale is None else float(scale),  # the core's 0: 1/sqrt(D)
            to_dlpack(out),
            None if ws is None else to_dlpack(ws),
            stream,
            total,
        )
        self._host_lengths += t
        self._max_len = max_len
        self._total = total
        self._room -= t
        return out

    def _check_step(self, k: object, v: object, q: object, scale: object) -> None:
        """The errors of :meth:`append_attend` for what it reads before the core sees the arguments."""
        kt, _ = _check_kv("k", k, "v", v)
        qt = check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
        for name, tensor in (("k", kt), ("q", qt)):
            if tensor.dtype != self._dtype:
                raise TypeError(f"{name} must have the store's dtype {self._dtype}, got {tensor.dtype}")
        if qt.shape[2] != kt.shape[2]:
            raise ValueError(f"q must hold the queries of the {kt.shape[2]} tokens of k, got shape {tuple(qt.shape)}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
        if scale == 0:
            raise ValueError(f"scale must be a non-zero number or None, got {scale!r}")

    def _grow(self, extra: int) -> None:
        caps = np.maximum(2 * self._host_caps, self._host_lengths + extra)
        index = torch.arange(caps.size, dtype=torch.int32, device=self.device)
        self._rebuild(index, caps, self._host_lengths.copy())

    def _rebuild(self, src_index: torch.Tensor, caps: np.ndarray, host_lengths: np.ndarray) -> None:
        """New buffers with reservations ``caps``; destination segment i copies src segment src_index[i]."""
        offsets = _offsets_of(caps)
        slots = int(caps.sum())
        if slots >= 2**31:
            raise ValueError(f"the store would need {slots} slots, more than int32 offsets can address")
        d = self.head_dim
        k_buf = torch.empty((slots, d), dtype=self.dtype, device=self.device)
        v_buf = torch.empty((slots, d), dtype=self.dtype, device=self.device)
        lengths = torch.empty(caps.size, dtype=torch.int32, device=self.device)
        dst_offsets = to_device_async(torch.from_numpy(offsets.astype(np.int32)), self.device)
        call(
            _core.store_copy_segments,
            self._k,
            self._v,
            self._offsets,
            self._lengths,
            src_index,
            dst_offsets,
            k_buf,
            v_buf,
            lengths,
            stream_handle(self.device),
        )
        self._k, self._v, self._lengths, self._offsets = k_buf, v_buf, lengths, dst_offsets
        self._host_offsets, self._host_caps, self._host_lengths = offsets, caps.astype(np.int64), host_lengths
        self._refresh()

    def attend(self, q: torch.Tensor, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
        """Attention of q ``[B, Hq, T, D]`` (the queries of the last T appended tokens) -> ``[B, Hq, T, D]``.

        Query t sees the first ``length - T + t + 1`` tokens of its segment. ``scale`` defaults to
        1/sqrt(D). backend: ``"auto"``/``"mixkv"`` (own kernel), ``"flash"`` (flash-attn) or
        ``"torch"`` (torch's varlen_attn); the latter two need CUDA and float16/bfloat16.
        """
        # Fast path of the checks below (same acceptance) for the own kernel, always available.
        if (
            (backend == "auto" or backend == "mixkv")
            and type(q) is torch.Tensor
            and q.dim() == 4
            and q.dtype is self._dtype
            and q.shape[0] == self._batch
            and q.shape[3] == self._dim
            and q.shape[1] >= 1
            and q.shape[1] % self._hkv == 0
            and q.shape[2] >= 1
            and (self._dim == 1 or q.stride(3) == 1)
            and q.device == self._device
            and (scale is None or (type(scale) is float and scale != 0.0))
        ):
            return self._attend_own(q, 0.0 if scale is None else scale)
        qt = check_last_dim_contiguous("q", check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES))
        b, hq, t, d = qt.shape
        if b != self._batch or d != self.head_dim or hq < 1 or hq % self._hkv != 0 or t < 1:
            raise ValueError(
                f"q must have shape [{self._batch}, Hq (a multiple of {self._hkv}), T >= 1, {self.head_dim}], "
                f"got {tuple(qt.shape)}"
            )
        if qt.dtype != self.dtype:
            raise TypeError(f"q must have the store's dtype {self.dtype}, got {qt.dtype}")
        if qt.device != self.device:
            raise ValueError(f"q is on {qt.device} but the store is on {self.device}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0):
            raise ValueError(f"scale must be a non-zero number or None, got {scale!r}")
        names = _backends.available(self.device, self.dtype)
        if not isinstance(backend, str) or backend not in names:
            raise ValueError(
                f"backend {backend!r} is not available for {self.dtype} on {self.device.type}; available: {names}"
            )
        sc = float(scale) if scale is not None else 0.0
        if backend in ("flash", "torch"):
            fn = _backends.flash if backend == "flash" else _backends.torch_varlen
            return fn(
                qt,
                self._k,
                self._v,
                self._offsets,
                self._lengths,
                int(self._host_caps.max()),
                sc if sc != 0.0 else d**-0.5,
            )
        return self._attend_own(qt, sc)

    def _attend_own(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """The own kernel on checked queries; scale 0 means 1/sqrt(D)."""
        b, hq, t, d = q.shape
        out = torch.empty((b, hq, t, d), dtype=self._dtype, device=self._device)
        ws = workspace(_core.attend_workspace_bytes(b, hq, t, d, self._max_len), self._device)
        call(
            _core.attend,
            q,
            self._k,
            self._v,
            self._offsets,
            self._lengths,
            self._max_len,
            scale,
            out,
            ws,
            stream_handle(self._device),
            self._total,
        )
        return out

    # ---- sequence management --------------------------------------------------------------------

    def reorder(self, indices: torch.Tensor | Sequence[int]) -> None:
        """Index-select sequences (beam search, batch filtering): new sequence i = old indices[i]."""
        if isinstance(indices, torch.Tensor):
            if indices.dim() != 1 or indices.dtype not in INDEX_DTYPES:
                raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
            idx = [int(i) for i in indices.tolist()]
        else:
            idx = [check_int("indices[]", i) for i in indices]
        if not idx:
            raise ValueError("indices must not be empty")
        bad = [i for i in idx if i < 0 or i >= self._batch]
        if bad:
            raise ValueError(f"indices must lie in [0, {self._batch}), got {bad[:5]}")
        seg = (np.asarray(idx, dtype=np.int64)[:, None] * self._hkv + np.arange(self._hkv)[None, :]).reshape(-1)
        src_index = torch.as_tensor(seg.astype(np.int32)).to(self.device)
        self._rebuild(src_index, self._host_caps[seg].copy(), self._host_lengths[seg].copy())
        self._batch = len(idx)

    def reset(self, batch_index: int) -> None:
        """Empty every segment of sequence ``batch_index`` (its reservations stay)."""
        b = check_int("batch_index", batch_index, minimum=0)
        if b >= self._batch:
            raise ValueError(f"batch_index must lie in [0, {self._batch}), got {b}")
        self._lengths[b * self._hkv : (b + 1) * self._hkv] = 0
        self._host_lengths[b * self._hkv : (b + 1) * self._hkv] = 0
        self._refresh()

    def segment(self, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[length, D]`` of the K and V tokens of sequence b, kv head h (for inspection)."""
        b = check_int("b", b, minimum=0)
        h = check_int("h", h, minimum=0)
        if b >= self._batch or h >= self._hkv:
            raise ValueError(f"(b, h) must lie in [0, {self._batch}) x [0, {self._hkv}), got ({b}, {h})")
        s = b * self._hkv + h
        start, n = int(self._host_offsets[s]), int(self._host_lengths[s])
        return self._k[start : start + n], self._v[start : start + n]

    # ---- properties -----------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        """int32 ``[B, Hkv]`` tokens per segment, on the store's device."""
        return self._lengths.view(self._batch, self._hkv)

    @property
    def offsets(self) -> torch.Tensor:
        """int32 ``[B, Hkv]`` first row of each segment in the buffers, on the store's device."""
        return self._offsets.view(self._batch, self._hkv)

    @property
    def host_lengths(self) -> np.ndarray:
        """int64 ``[B, Hkv]`` host copy of :attr:`lengths` (never synchronises)."""
        return self._host_lengths.reshape(self._batch, self._hkv).copy()

    @property
    def capacities(self) -> np.ndarray:
        """int64 ``[B, Hkv]`` reserved rows per segment (host)."""
        return self._host_caps.reshape(self._batch, self._hkv).copy()

    @property
    def max_length(self) -> int:
        return self._max_len

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V tokens stored (reservations excluded)."""
        return int(self._host_lengths.sum()) * self.head_dim * self._k.element_size() * 2

    @property
    def reserved_nbytes(self) -> int:
        """Bytes of the K and V buffers (reservations included)."""
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def num_kv_heads(self) -> int:
        return self._hkv

    @property
    def head_dim(self) -> int:
        return int(self._k.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def k_buffer(self) -> torch.Tensor:
        """The K buffer ``[slots, D]`` (segments at :attr:`offsets`; rows past a length are unused)."""
        return self._k

    @property
    def v_buffer(self) -> torch.Tensor:
        """The V buffer ``[slots, D]``."""
        return self._v

    def __repr__(self) -> str:
        return (
            f"VarlenKVStore(batch_size={self._batch}, num_kv_heads={self._hkv}, head_dim={self.head_dim}, "
            f"dtype={self.dtype}, device={self.device}, max_length={self.max_length}, "
            f"nbytes={self.nbytes}, reserved_nbytes={self.reserved_nbytes})"
        )


__all__ = ["DEFAULT_RESERVE", "VarlenKVStore"]
