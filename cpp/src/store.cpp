// Varlen KV store: argument validation, device dispatch and the CPU twins (plain row copies).
#include "mixkv/store.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

#include "mixkv/dispatch.hpp"
#include "mixkv/error.hpp"

namespace mixkv {

namespace {

void check_index_vector(const Tensor& t, const char* name, int64_t n) {
  check_tensor(t, name, 1);
  check_dtype(t, name, DType::i32);
  check_contiguous(t, name);
  require(t.shape[0] == n, name, " must have shape [", n, "], got [", t.shape[0], "]");
}

void check_buffer(const Tensor& buf, const char* name, const Tensor& like, const char* like_name, int64_t d) {
  check_tensor(buf, name, 2);
  require(buf.dtype == like.dtype, name, " must have the dtype of ", like_name, " (", dtype_name(like.dtype),
          "), got ", dtype_name(buf.dtype));
  check_contiguous(buf, name);
  require(buf.shape[1] == d, name, " must have shape [slots, ", d, "], got [", buf.shape[0], ", ", buf.shape[1],
          "]");
  check_same_device(buf, name, like, like_name);
}

// k_buf and v_buf: two distinct [slots, D] buffers of one size, with the dtype and device of `like`.
void check_buffer_pair(const Tensor& k_buf, const Tensor& v_buf, const Tensor& like, const char* like_name,
                       int64_t d) {
  check_buffer(k_buf, "k_buf", like, like_name, d);
  check_buffer(v_buf, "v_buf", like, like_name, d);
  require(k_buf.shape[0] == v_buf.shape[0], "v_buf must have the shape of k_buf");
  require(k_buf.data != v_buf.data || k_buf.numel() == 0, "k_buf and v_buf must be distinct buffers");
}

void check_kv_pair(const Tensor& k, const char* kn, const Tensor& v, const char* vn) {
  check_tensor(k, kn, 4);
  check_tensor(v, vn, 4);
  check_float(k, kn);
  require(v.dtype == k.dtype, vn, " must have the dtype of ", kn, " (", dtype_name(k.dtype), "), got ",
          dtype_name(v.dtype));
  for (int i = 0; i < 4; ++i)
    require(k.shape[i] == v.shape[i], vn, " must have the shape of ", kn, " (dimension ", i, ": ", k.shape[i],
            " vs ", v.shape[i], ")");
  check_last_dim_contiguous(k, kn);
  check_last_dim_contiguous(v, vn);
  check_same_device(k, kn, v, vn);
}

// Row `row` of a [slots, D] buffer.
inline char* buf_row(const Tensor& buf, int64_t row) {
  return static_cast<char*>(buf.data) + row * buf.stride[0] * dtype_size(buf.dtype);
}

// Row (b, h, n) of a [B, Hkv, N, D] tensor.
inline const char* kv_row(const Tensor& t, int64_t b, int64_t h, int64_t n) {
  return static_cast<const char*>(t.data) +
         (b * t.stride[0] + h * t.stride[1] + n * t.stride[2]) * dtype_size(t.dtype);
}

}  // namespace

// ---- store_build --------------------------------------------------------------------------------

void store_build(const Tensor& keys, const Tensor& values, const Tensor& positions, const Tensor& counts,
                 const Tensor& valid_lengths, int64_t window, const Tensor& offsets, const Tensor& k_buf,
                 const Tensor& v_buf, const Tensor& lengths, std::uintptr_t stream) {
  check_kv_pair(keys, "keys", values, "values");
  const int64_t B = keys.shape[0], H = keys.shape[1], D = keys.shape[3];
  check_tensor(positions, "positions", 3);
  check_dtype(positions, "positions", DType::i32);
  check_contiguous(positions, "positions");
  require(positions.shape[0] == B && positions.shape[1] == H, "positions must have shape [", B, ", ", H,
          ", C], got [", positions.shape[0], ", ", positions.shape[1], ", ", positions.shape[2], "]");
  check_tensor(counts, "counts", 2);
  check_dtype(counts, "counts", DType::i32);
  check_contiguous(counts, "counts");
  require(counts.shape[0] == B && counts.shape[1] == H, "counts must have shape [", B, ", ", H, "], got [",
          counts.shape[0], ", ", counts.shape[1], "]");
  if (valid_lengths.present) check_index_vector(valid_lengths, "valid_lengths", B);
  require(window >= 0, "window must be >= 0, got ", window);
  check_index_vector(offsets, "offsets", B * H);
  check_index_vector(lengths, "lengths", B * H);
  check_buffer_pair(k_buf, v_buf, keys, "keys", D);
  check_same_device(positions, "positions", keys, "keys");
  check_same_device(counts, "counts", keys, "keys");
  if (valid_lengths.present) check_same_device(valid_lengths, "valid_lengths", keys, "keys");
  check_same_device(offsets, "offsets", keys, "keys");
  check_same_device(lengths, "lengths", keys, "keys");
  if (keys.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    cuda::store_build(keys, values, positions, counts, valid_lengths, window, offsets, k_buf, v_buf, lengths, stream);
#else
    (void)stream;
    no_cuda("store_build");
#endif
    return;
  }
  cpu::store_build(keys, values, positions, counts, valid_lengths, window, offsets, k_buf, v_buf, lengths);
}

void cpu::store_build(const Tensor& keys, const Tensor& values, const Tensor& positions, const Tensor& counts,
                      const Tensor& valid_lengths, int64_t window, const Tensor& offsets, const Tensor& k_buf,
                      const Tensor& v_buf, const Tensor& lengths) {
  const int64_t B = keys.shape[0], H = keys.shape[1], N = keys.shape[2], D = keys.shape[3];
  const int64_t C = positions.shape[2], slots = k_buf.shape[0];
  const size_t row_bytes = static_cast<size_t>(D) * dtype_size(keys.dtype);
  const int32_t* pos = positions.ptr<int32_t>();
  const int32_t* cnt = counts.ptr<int32_t>();
  const int32_t* off = offsets.ptr<int32_t>();
  int32_t* len = lengths.ptr<int32_t>();
  // Validate everything first so that a failure leaves the outputs untouched.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nb = valid_lengths.present ? valid_lengths.ptr<int32_t>()[b] : N;
    require(nb >= 0 && nb <= N, "valid_lengths[", b, "] must lie in [0, ", N, "], got ", nb);
    const int64_t wstart = std::max(N - window, N - nb);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t s = b * H + h;
      const int64_t c = cnt[s];
      require(c >= 0 && c <= C, "counts[", b, ", ", h, "] must lie in [0, ", C, "], got ", c);
      int64_t prev = -1;
      for (int64_t i = 0; i < c; ++i) {
        const int64_t p = pos[s * C + i];
        require(p >= N - nb && p < wstart, "positions[", b, ", ", h, ", ", i, "] = ", p,
                " must be a valid prefix position in [", N - nb, ", ", wstart, ")");
        require(p > prev, "positions[", b, ", ", h, ", :counts] must be strictly ascending");
        prev = p;
      }
      const int64_t total = c + (N - wstart);
      require(off[s] >= 0 && off[s] + total <= slots, "offsets[", s, "] = ", off[s], " leaves no room for ",
              total, " tokens in buffers of ", slots, " slots");
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nb = valid_lengths.present ? valid_lengths.ptr<int32_t>()[b] : N;
    const int64_t wstart = std::max(N - window, N - nb);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t s = b * H + h;
      const int64_t c = cnt[s];
      int64_t dst = off[s];
      for (int64_t i = 0; i < c; ++i, ++dst) {
        const int64_t p = pos[s * C + i];
        std::memcpy(buf_row(k_buf, dst), kv_row(keys, b, h, p), row_bytes);
        std::memcpy(buf_row(v_buf, dst), kv_row(values, b, h, p), row_bytes);
      }
      for (int64_t p = wstart; p < N; ++p, ++dst) {
        std::memcpy(buf_row(k_buf, dst), kv_row(keys, b, h, p), row_bytes);
        std::memcpy(buf_row(v_buf, dst), kv_row(values, b, h, p), row_bytes);
      }
      len[s] = static_cast<int32_t>(dst - off[s]);
    }
  }
}

// ---- store_append -------------------------------------------------------------------------------

void store_append(const Tensor& k_new, const Tensor& v_new, const Tensor& offsets, const Tensor& lengths,
                  const Tensor& k_buf, const Tensor& v_buf, std::uintptr_t stream) {
  check_kv_pair(k_new, "k_new", v_new, "v_new");
  const int64_t B = k_new.shape[0], H = k_new.shape[1], D = k_new.shape[3];
  check_index_vector(offsets, "offsets", B * H);
  check_index_vector(lengths, "lengths", B * H);
  check_buffer_pair(k_buf, v_buf, k_new, "k_new", D);
  check_same_device(offsets, "offsets", k_new, "k_new");
  check_same_device(lengths, "lengths", k_new, "k_new");
  if (k_new.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    cuda::store_append(k_new, v_new, offsets, lengths, k_buf, v_buf, stream);
#else
    (void)stream;
    no_cuda("store_append");
#endif
    return;
  }
  cpu::store_append(k_new, v_new, offsets, lengths, k_buf, v_buf);
}

void cpu::store_append(const Tensor& k_new, const Tensor& v_new, const Tensor& offsets, const Tensor& lengths,
                       const Tensor& k_buf, const Tensor& v_buf) {
  const int64_t B = k_new.shape[0], H = k_new.shape[1], T = k_new.shape[2], D = k_new.shape[3];
  const int64_t slots = k_buf.shape[0];
  const size_t row_bytes = static_cast<size_t>(D) * dtype_size(k_new.dtype);
  const int32_t* off = offsets.ptr<int32_t>();
  int32_t* len = lengths.ptr<int32_t>();
  for (int64_t s = 0; s < B * H; ++s)
    require(off[s] >= 0 && len[s] >= 0 && off[s] + len[s] + T <= slots, "store_append: segment ", s,
            " (offset ", off[s], ", length ", len[s], ") has no room for ", T, " more tokens in ", slots, " slots");
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t s = b * H + h;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t dst = off[s] + len[s] + t;
        std::memcpy(buf_row(k_buf, dst), kv_row(k_new, b, h, t), row_bytes);
        std::memcpy(buf_row(v_buf, dst), kv_row(v_new, b, h, t), row_bytes);
      }
      len[s] += static_cast<int32_t>(T);
    }
  }
}

// ---- store_copy_segments ------------------------------------------------------------------------

void store_copy_segments(const Tensor& src_k, const Tensor& src_v, const Tensor& src_offsets,
                         const Tensor& src_lengths, const Tensor& src_index, const Tensor& dst_offsets,
                         const Tensor& dst_k, const Tensor& dst_v, const Tensor& dst_lengths,
                         std::uintptr_t stream) {
  check_tensor(src_k, "src_k", 2);
  check_float(src_k, "src_k");
  check_contiguous(src_k, "src_k");
  const int64_t D = src_k.shape[1];
  check_buffer(src_v, "src_v", src_k, "src_k", D);
  require(src_v.shape[0] == src_k.shape[0], "src_v must have the shape of src_k");
  check_tensor(src_offsets, "src_offsets", 1);
  const int64_t S_src = src_offsets.shape[0];
  check_index_vector(src_offsets, "src_offsets", S_src);
  check_index_vector(src_lengths, "src_lengths", S_src);
  check_tensor(src_index, "src_index", 1);
  const int64_t S_dst = src_index.shape[0];
  check_index_vector(src_index, "src_index", S_dst);
  check_index_vector(dst_offsets, "dst_offsets", S_dst);
  check_index_vector(dst_lengths, "dst_lengths", S_dst);
  check_buffer(dst_k, "dst_k", src_k, "src_k", D);
  check_buffer(dst_v, "dst_v", src_k, "src_k", D);
  require(dst_v.shape[0] == dst_k.shape[0], "dst_v must have the shape of dst_k");
  const bool empty = dst_k.numel() == 0;
  require(empty || (dst_k.data != dst_v.data && dst_k.data != src_k.data && dst_k.data != src_v.data &&
                    dst_v.data != src_k.data && dst_v.data != src_v.data),
          "dst_k and dst_v must be buffers distinct from each other and from src_k/src_v");
  require(dst_lengths.data != src_lengths.data || S_dst == 0, "dst_lengths must not alias src_lengths");
  for (const auto& [t, n] : {std::pair<const Tensor*, const char*>{&src_offsets, "src_offsets"},
                            {&src_lengths, "src_lengths"},
                            {&src_index, "src_index"},
                            {&dst_offsets, "dst_offsets"},
                            {&dst_lengths, "dst_lengths"}})
    check_same_device(*t, n, src_k, "src_k");
  if (src_k.is_cuda()) {
#ifdef MIXKV_WITH_CUDA
    cuda::store_copy_segments(src_k, src_v, src_offsets, src_lengths, src_index, dst_offsets, dst_k, dst_v,
                              dst_lengths, stream);
#else
    (void)stream;
    no_cuda("store_copy_segments");
#endif
    return;
  }
  cpu::store_copy_segments(src_k, src_v, src_offsets, src_lengths, src_index, dst_offsets, dst_k, dst_v,
                           dst_lengths);
}

void cpu::store_copy_segments(const Tensor& src_k, const Tensor& src_v, const Tensor& src_offsets,
                              const Tensor& src_lengths, const Tensor& src_index, const Tensor& dst_offsets,
                              const Tensor& dst_k, const Tensor& dst_v, const Tensor& dst_lengths) {
  const int64_t S_src = src_offsets.shape[0], S_dst = src_index.shape[0];
  const int64_t slots_src = src_k.shape[0], slots_dst = dst_k.shape[0];
  const size_t row_bytes = static_cast<size_t>(src_k.shape[1]) * dtype_size(src_k.dtype);
  const int32_t* soff = src_offsets.ptr<int32_t>();
  const int32_t* slen = src_lengths.ptr<int32_t>();
  const int32_t* idx = src_index.ptr<int32_t>();
  const int32_t* doff = dst_offsets.ptr<int32_t>();
  int32_t* dlen = dst_lengths.ptr<int32_t>();
  for (int64_t i = 0; i < S_dst; ++i) {
    const int64_t j = idx[i];
    require(j >= 0 && j < S_src, "src_index[", i, "] = ", j, " must lie in [0, ", S_src, ")");
    require(soff[j] >= 0 && slen[j] >= 0 && soff[j] + slen[j] <= slots_src, "source segment ", j,
            " (offset ", soff[j], ", length ", slen[j], ") lies outside src_k's ", slots_src, " slots");
    require(doff[i] >= 0 && doff[i] + slen[j] <= slots_dst, "dst_offsets[", i, "] = ", doff[i],
            " leaves no room for ", slen[j], " tokens in dst_k's ", slots_dst, " slots");
  }
  for (int64_t i = 0; i < S_dst; ++i) {
    const int64_t j = idx[i];
    if (slen[j] > 0) {
      std::memcpy(buf_row(dst_k, doff[i]), buf_row(src_k, soff[j]), row_bytes * slen[j]);
      std::memcpy(buf_row(dst_v, doff[i]), buf_row(src_v, soff[j]), row_bytes * slen[j]);
    }
    dlen[i] = slen[j];
  }
}

}  // namespace mixkv
