#include "cuda/sparse_tier_kernels.cuh"

namespace tailorkv::cuda {}  // namespace tailorkv::cuda
