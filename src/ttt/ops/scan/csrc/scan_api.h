// Entry points of the compiled scan per inner model and scalar type (defined in scan_linear.cpp and
// scan_mlp.cpp, called from scan_ops.cpp). Pointers are to contiguous row-major data.
#pragma once

#include <cstdint>
#include <vector>

namespace ttt_scan {

struct Dims;

#define TTT_DECLARE(NAME)                                                                                    \
  template <typename T>                                                                                      \
  void NAME##_forward(const Dims& d, const T* k, const T* q, const T* s, const T* lr, const T* coef,         \
                      const T* lnw, const int64_t* nc, std::vector<const T*> init, std::vector<T*> fin,      \
                      std::vector<T*> ckpt, long group, T* zbar);                                            \
  template <typename T>                                                                                      \
  void NAME##_backward(const Dims& d, const T* k, const T* q, const T* s, const T* lr, const T* coef,        \
                       const T* lnw, const int64_t* nc, std::vector<const T*> ckpt, long group,              \
                       const T* dzbar, std::vector<const T*> d_final, T* dk, T* dq, T* ds, T* dlr,           \
                       T* dcoef, T* dlnw, std::vector<T*> d_init);
TTT_DECLARE(linear)
TTT_DECLARE(mlp)
#undef TTT_DECLARE

}  // namespace ttt_scan
