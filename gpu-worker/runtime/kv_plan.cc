#include "runtime/kv_plan.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tailorkv::runtime {

std::string_view KvPolicyName(KvPolicyKind kind) {
  switch (kind) {
    case KvPolicyKind::kDense: return "dense";
    case KvPolicyKind::kQuant: return "quant";
    case KvPolicyKind::kWindow: return "window";
    case KvPolicyKind::kSparse: return "sparse";
  }
  return "unknown";
}

KvPlan KvPlan::Dense(int n_layers) {
  KvPlan plan;
  plan.name = "dense";
  plan.layers.assign(n_layers, LayerKvPolicy{});
  return plan;
}

KvPlan KvPlan::Uniform(int n_layers, const LayerKvPolicy& policy, std::string name) {
  KvPlan plan;
  plan.name = std::move(name);
  plan.layers.assign(n_layers, policy);
  return plan;
}

bool KvPlan::all_dense() const {
  for (const LayerKvPolicy& l : layers) {
    if (l.kind != KvPolicyKind::kDense) return false;
  }
  return true;
}

absl::Status KvPlan::Validate(const model::ModelConfig& config) const {
  if (static_cast<int>(layers.size()) != config.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("plan has ", layers.size(),
                                                   " layers, the model has ", config.n_layers));
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::runtime
