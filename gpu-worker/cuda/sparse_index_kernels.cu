#include "cuda/sparse_index_kernels.cuh"

namespace tailorkv::cuda {}  // namespace tailorkv::cuda
