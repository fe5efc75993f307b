// Entry points of the compiled scan per inner model, scalar type and Io layout (defined in
// scan_linear.cpp and scan_mlp.cpp, called from scan_ops.cpp). State pointers are to contiguous
// row-major data; the inputs and outputs of the mini-batches go through the Io (scan_io.h).
#pragma once

#include <cstdint>
#include <vector>

#include "scan_io.h"

namespace ttt_scan {

#define TTT_DECLARE(NAME)                                                                                    \
  template <typename T, typename Io>                                                                         \
  void NAME##_forward(const Dims& d, const Io& io, const int64_t* nc, std::vector<const T*> init,            \
                      std::vector<T*> fin, std::vector<T*> ckpt, long group);                                \
  template <typename T, typename Io>                                                                         \
  void NAME##_backward(const Dims& d, const Io& io, const int64_t* nc, std::vector<const T*> ckpt, long group, \
                       std::vector<const T*> d_final, T* dcoef, T* dlnw, std::vector<T*> d_init);
TTT_DECLARE(linear)
TTT_DECLARE(mlp)
#undef TTT_DECLARE

// every (scalar type, Io) pair the library provides
#define TTT_FOR_EACH_IO(X) \
  X(float, PlainIo<float>) \
  X(double, PlainIo<double>) \
  X(float, HeadsIo<float>) \
  X(double, HeadsIo<double>)

}  // namespace ttt_scan
