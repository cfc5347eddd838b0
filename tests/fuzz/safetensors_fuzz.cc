// Fuzz target: .safetensors files (model/safetensors.h).
//
// Input: a safetensors image (SafetensorsFile::FromBytes, the parser Open
// runs on a mapping).
// Invariants: errors are InvalidArgument / DataLoss; every tensor of an
// accepted file lies inside the data section and holds exactly
// prod(shape) elements; ToFloat gives that many values or an error.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "model/safetensors.h"

namespace model = tailorkv::model;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = model::SafetensorsFile::FromBytes("fuzz.safetensors",
                                                std::vector<uint8_t>(data, data + size));
  if (!file.ok()) {
    const auto code = file.status().code();
    FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kDataLoss,
               "%s", file.status().ToString().c_str());
    return 0;
  }
  for (const model::SafetensorsTensorInfo& t : (*file)->tensors()) {
    FUZZ_CHECK(t.begin <= t.end && t.end <= size, "range [%llu, %llu) of a %zu-byte file",
               static_cast<unsigned long long>(t.begin), static_cast<unsigned long long>(t.end),
               size);
    FUZZ_CHECK(t.end - t.begin == t.n_elements * static_cast<uint64_t>(t.element_bytes),
               "tensor '%s' bytes", t.name.c_str());
    FUZZ_CHECK((*file)->TensorBytes(t).size() == t.end - t.begin, "TensorBytes");
    FUZZ_CHECK((*file)->Find(t.name) != nullptr, "Find('%s')", t.name.c_str());
    auto values = (*file)->ToFloat(t.name);
    if (values.ok()) FUZZ_CHECK(values->size() == t.n_elements, "ToFloat size");
  }
  return 0;
}
