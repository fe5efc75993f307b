// The scan over mini-batches, generic over the inner model (TTT-Linear / TTT-MLP): forward with
// group checkpoints, and the reverse scan that recomputes each group from its checkpoint. One row
// (batch * head) is one independent sequential problem; rows run in parallel with at::parallel_for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "scan_io.h"
#include "scan_kernels.h"

namespace ttt_scan {

// Per-thread working memory (tapes, checkpoint-group states, scratch) that outlives the call: ATen's
// worker threads persist, so each keeps one buffer, grown to the largest call it has served and reused
// after that. Fresh large allocations cost a page fault per 4 KiB on every call (the allocator hands the
// memory back between calls); reusing the buffer does not. Contents are not zeroed (every use writes
// before it reads).
template <typename T> T* thread_workspace(size_t n) {
  thread_local std::vector<T> ws;
  if (ws.size() < n) {
    ws.clear();
    ws.shrink_to_fit();
    ws.resize(n);
  }
  return ws.data();
}

template <typename T> inline bool any_nonzero(const T* x, long n) {
  for (long i = 0; i < n; ++i)
    if (x[i] != T(0)) return true;
  return false;
}

// Accumulators (the second half of the state) are tracked by a flag acc_nz: when it is false they are
// zero and their memory may be stale (never read; written as zeros where a state leaves the scan).
// Checkpoints: ckpt holds NS tensors, or only the NS / 2 weights when the caller knows the accumulators
// are zero at every checkpoint (zero initial accumulators and every mini-batch before the last
// checkpoint complete): then they are neither stored in the forward nor read back in the backward.
// Model<T> provides: NS (number of state tensors; the second half are the accumulators),
// sizes(d, out[NS]), tape_size(d), scratch_size(d),
// tape(d, st, acc_nz, mb, tape, scratch, zbar_or_null, full),
// update(d, src, dst, acc_nz, mb, tape, scratch), backward(d, st, acc_nz, mb, tape, dzbar, dst, grads, scratch).
template <typename T, typename Model, typename Io>
void scan_forward_impl(const Dims& d, const Io& io, const int64_t* n_complete, std::vector<const T*> init,
                       std::vector<T*> final_st, std::vector<T*> ckpt, long group) {
  constexpr int NS = Model::NS;
  long sz[NS];
  Model::sizes(d, sz);
  const long n_groups = ckpt.empty() ? 0 : (d.N + group - 1) / group;
  const int n_ckpt = static_cast<int>(ckpt.size());  // NS, NS / 2 (weights only) or 0
  // A thread steps its rows through the mini-batches together (mini-batch outer, row inner): with the
  // layer's [B, L, NH, F] layout (HeadsIo), neighbouring heads read neighbouring memory, so the strided
  // token rows stream instead of each costing a cache miss.
  at::parallel_for(0, d.R, 1, [&](int64_t r0, int64_t r1) {
    const long n_tape = Model::tape_size(d), n_scratch = Model::scratch_size(d);
    T* tape = thread_workspace<T>(n_tape + n_scratch + Io::buf_size(d));
    T* scratch = tape + n_tape;
    T* buf = scratch + n_scratch;
    std::vector<char> acc(r1 - r0);
    auto state_of = [&](int64_t r, T** st) {
      for (int i = 0; i < NS; ++i) st[i] = final_st[i] + r * sz[i];
    };
    for (int64_t r = r0; r < r1; ++r) {
      T* st[NS];
      state_of(r, st);
      bool nz = false;
      for (int i = 0; i < NS; ++i) {
        std::copy(init[i] + r * sz[i], init[i] + (r + 1) * sz[i], st[i]);
        if (i >= NS / 2) nz = nz || any_nonzero(st[i], sz[i]);
      }
      acc[r - r0] = nz;
    }
    for (long m = 0; m < d.N; ++m)
      for (int64_t r = r0; r < r1; ++r) {
        T* st[NS];
        state_of(r, st);
        bool acc_nz = acc[r - r0];
        if (n_ckpt && m % group == 0) {
          TORCH_CHECK(n_ckpt == NS || !acc_nz, "ttt_scan: non-zero accumulators at a weights-only checkpoint");
          for (int i = 0; i < n_ckpt; ++i) {
            T* c = ckpt[i] + (r * n_groups + m / group) * sz[i];
            if (i < NS / 2 || acc_nz)
              std::copy(st[i], st[i] + sz[i], c);
            else
              std::fill(c, c + sz[i], T(0));
          }
        }
        Mb<T> mb = io.load(d, r, m, buf);
        mb.first = m == 0;
        mb.complete = m < n_complete[r];
        T* zbar = io.zbar_out(d, r, m, buf);
        Model::tape(d, st, acc_nz, mb, tape, scratch, zbar, false);
        io.emit(d, r, m, mb, zbar, buf);
        Model::update(d, st, st, acc_nz, mb, tape, scratch);
        acc[r - r0] = acc_nz;
      }
    for (int64_t r = r0; r < r1; ++r) {
      T* st[NS];
      state_of(r, st);
      if (!acc[r - r0])
        for (int i = NS / 2; i < NS; ++i) std::fill(st[i], st[i] + sz[i], T(0));
    }
  });
}

template <typename T, typename Model, typename Io>
void scan_backward_impl(const Dims& d, const Io& io, const int64_t* n_complete, std::vector<const T*> ckpt,
                        long group, std::vector<const T*> d_final, T* dcoef_rows, T* dlnw,
                        std::vector<T*> d_init) {
  constexpr int NS = Model::NS;
  long sz[NS];
  Model::sizes(d, sz);
  long state_size = 0;
  for (int i = 0; i < NS; ++i) state_size += sz[i];
  const long n_groups = (d.N + group - 1) / group;
  const long tsz = Model::tape_size(d);
  const int n_ckpt = static_cast<int>(ckpt.size());  // NS, or NS / 2: the accumulators are zero there
  at::parallel_for(0, d.R, 1, [&](int64_t r0, int64_t r1) {
    const long g = std::min(group, d.N);
    const long n_scratch = Model::scratch_size(d);
    T* slots = thread_workspace<T>(g * (state_size + tsz) + n_scratch + Io::buf_size(d));
    T* tapes = slots + g * state_size;
    T* scratch = tapes + g * tsz;
    T* buf = scratch + n_scratch;
    std::vector<char> acc(g);
    auto slot = [&](long j, T** st) {
      T* p = slots + j * state_size;
      for (int i = 0; i < NS; ++i) {
        st[i] = p;
        p += sz[i];
      }
    };
    for (int64_t r = r0; r < r1; ++r) {
      for (int i = 0; i < NS; ++i)
        std::copy(d_final[i] + r * sz[i], d_final[i] + (r + 1) * sz[i], d_init[i] + r * sz[i]);
      std::fill(dcoef_rows + r * d.b, dcoef_rows + (r + 1) * d.b, T(0));
      if (dlnw) std::fill(dlnw + r * d.F, dlnw + (r + 1) * d.F, T(0));
      io.begin_row(d, r);
    }
    // groups outer, rows inner (as in the forward: neighbouring heads read neighbouring memory)
    for (long gi = n_groups - 1; gi >= 0; --gi) {
      const long m0 = gi * group, m1 = std::min(m0 + group, d.N);
      for (int64_t r = r0; r < r1; ++r) {
        T* dst[NS];
        for (int i = 0; i < NS; ++i) dst[i] = d_init[i] + r * sz[i];
        T* dc = dcoef_rows + r * d.b;
        T* dl = dlnw ? dlnw + r * d.F : nullptr;
        auto mb_at = [&](long m) {  // loads into buf (valid until the next call)
          Mb<T> mb = io.load(d, r, m, buf);
          mb.first = m == 0;
          mb.complete = m < n_complete[r];
          return mb;
        };
        // recompute the group's tapes from its checkpoint
        T* st[NS];
        slot(0, st);
        bool nz = false;
        for (int i = 0; i < n_ckpt; ++i) {
          const T* c = ckpt[i] + (r * n_groups + gi) * sz[i];
          std::copy(c, c + sz[i], st[i]);
          if (i >= NS / 2) nz = nz || any_nonzero(c, sz[i]);
        }
        acc[0] = nz;
        for (long m = m0; m < m1; ++m) {
          const long j = m - m0;
          slot(j, st);
          Mb<T> mb = mb_at(m);
          Model::tape(d, st, acc[j], mb, tapes + j * tsz, scratch, nullptr, true);
          if (m + 1 < m1) {
            T* nx[NS];
            slot(j + 1, nx);
            bool a = acc[j];
            Model::update(d, st, nx, a, mb, tapes + j * tsz, scratch);  // writes the next slot
            acc[j + 1] = a;
          }
        }
        // and run it backwards
        for (long m = m1 - 1; m >= m0; --m) {
          const long j = m - m0;
          slot(j, st);
          const Mb<T> mb = mb_at(m);
          const T* dzb = io.dzbar_of(d, r, m, mb, buf, dl);
          const MbGrad<T> gr = io.grads(d, r, m, buf, dc, dl);
          Model::backward(d, st, acc[j], mb, tapes + j * tsz, dzb, dst, gr, scratch);
          io.emit_grads(d, r, m, mb, gr, buf);
        }
      }
    }
  });
}

}  // namespace ttt_scan
