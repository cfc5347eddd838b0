#include "profiler/identify.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/openmp_env.h"
#include "runtime/fp8_reference.h"
#include "runtime/quant_kv.h"
#include "runtime/sparse_reference.h"

namespace tailorkv::profiler {
namespace {

using runtime::Backend;

// fp32 rounded to the nearest bf16 (ties to even), as the GPU stores it.
float RoundToBf16(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t b;
  std::memcpy(&b, &x, 4);
  b += 0x7FFFu + ((b >> 16) & 1u);
  b &= 0xFFFF0000u;
  std::memcpy(&x, &b, 4);
  return x;
}

absl::Status SettingError(const char* field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("settings.", field, ": ", what));
}

// Softmax attention of one query over the listed key rows, in double
// (the reference every policy is compared against, and the sparse policy's
// own attention: its error is then only the rows it leaves out).
void AttendRows(const float* q, const float* k, const float* v, const std::vector<int>& rows,
                int hd, double scale, std::vector<double>& w, double* out) {
  const int m = static_cast<int>(rows.size());
  w.resize(m);
  double mx = -INFINITY;
  for (int j = 0; j < m; ++j) {
    const float* kr = k + static_cast<int64_t>(rows[j]) * hd;
    double s = 0;
    for (int d = 0; d < hd; ++d) s += static_cast<double>(q[d]) * kr[d];
    w[j] = s * scale;
    mx = std::max(mx, w[j]);
  }
  double sum = 0;
  for (int j = 0; j < m; ++j) sum += (w[j] = std::exp(w[j] - mx));
  std::fill(out, out + hd, 0.0);
  for (int j = 0; j < m; ++j) {
    const float* vr = v + static_cast<int64_t>(rows[j]) * hd;
    const double p = w[j] / sum;
    for (int d = 0; d < hd; ++d) out[d] += p * vr[d];
  }
}

double RelativeError(const double* got, const double* want, int hd) {
  double num = 0, den = 0;
  for (int d = 0; d < hd; ++d) {
    num += (got[d] - want[d]) * (got[d] - want[d]);
    den += want[d] * want[d];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// TailorKV's score of one query row against all n keys (no causal mask).
double MassOutsideTop(const float* q, const float* k, int n, int hd, double scale, int top,
                      std::vector<double>& p) {
  p.resize(n);
  double mx = -INFINITY;
  for (int j = 0; j < n; ++j) {
    // fp32 logits as the reference's fp32 softmax sees them.
    float s = 0;
    const float* kr = k + static_cast<int64_t>(j) * hd;
    for (int d = 0; d < hd; ++d) s += q[d] * kr[d];
    p[j] = static_cast<double>(s) * scale;
    mx = std::max(mx, p[j]);
  }
  double sum = 0;
  for (int j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
  if (top <= 0) return 1.0;
  std::nth_element(p.begin(), p.begin() + (top - 1), p.end(), std::greater<>());
  double kept = 0;
  for (int j = 0; j < top; ++j) kept += p[j];
  return std::max(0.0, 1.0 - kept / sum);
}

}  // namespace

std::vector<int> ChannelCandidates(const PlanSettings& s, int head_dim) {
  std::vector<int> out = {std::min(s.channels, head_dim)};
  if (s.min_index_recall < 0) return out;
  const int most = std::min(head_dim, s.max_channels > 0 ? s.max_channels : 4 * s.channels);
  for (int d = 2 * s.channels; d <= most; d *= 2) out.push_back(d);
  return out;
}

std::vector<int> BitCandidates(const PlanSettings& s) {
  std::vector<int> out = {s.quant_bits};
  if (s.max_quant_error < 0) return out;
  for (int b : {2, 4}) {
    if (b > s.quant_bits) out.push_back(b);
  }
  return out;
}

std::vector<int> TopKCandidates(const PlanSettings& s, int calibration_tokens) {
  if (s.max_sparse_error < 0) return {s.top_k};
  const int most = s.max_top_k > 0 ? s.max_top_k : 4 * s.top_k;
  std::vector<int> out;
  for (int k : {s.top_k / 4, s.top_k / 2, s.top_k, 2 * s.top_k, 4 * s.top_k, 8 * s.top_k}) {
    const int64_t budget = static_cast<int64_t>(s.sink) + s.recent + k;
    if (k < 1 || k > most || budget + s.query_rows >= calibration_tokens) continue;
    if (out.empty() || out.back() != k) out.push_back(k);
  }
  if (out.empty()) out.push_back(s.top_k);  // ValidatePlanSettings checked that it fits
  return out;
}

double RoundScore(double x) {
  if (!std::isfinite(x) || x == 0) return x;
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", x);
  return std::strtod(buf, nullptr);
}

absl::Status ValidatePlanSettings(const PlanSettings& s, const model::ModelConfig& c,
                                  int calibration_tokens) {
  if (s.quant_bits != 1 && s.quant_bits != 2 && s.quant_bits != 4) {
    return SettingError("quant_bits", absl::StrCat("must be 1, 2 or 4, got ", s.quant_bits));
  }
  if (s.quant_group != 32 && s.quant_group != 64 && s.quant_group != 128) {
    return SettingError("quant_group", absl::StrCat("must be 32, 64 or 128, got ", s.quant_group));
  }
  if (c.head_dim % s.quant_group != 0) {
    return SettingError("quant_group", absl::StrCat("must divide the model's head_dim ",
                                                    c.head_dim, ", got ", s.quant_group));
  }
  if (s.quant_residual < s.quant_group || s.quant_residual % s.quant_group != 0 ||
      s.quant_residual > 4096) {
    return SettingError("quant_residual",
                        absl::StrCat("must be a positive multiple of quant_group (", s.quant_group,
                                     ") and <= 4096, got ", s.quant_residual));
  }
  if (s.sink < 0) return SettingError("sink", absl::StrCat("must be >= 0, got ", s.sink));
  if (s.recent < 1) return SettingError("recent", absl::StrCat("must be >= 1, got ", s.recent));
  if (s.top_k < 1) return SettingError("top_k", absl::StrCat("must be >= 1, got ", s.top_k));
  if (s.channels < 1 || s.channels > c.head_dim) {
    return SettingError("channels", absl::StrCat("must be in [1, head_dim ", c.head_dim,
                                                 "], got ", s.channels));
  }
  if (s.index != "gpu" && s.index != "faithful") {
    return SettingError("index", absl::StrCat("must be \"gpu\" or \"faithful\", got \"", s.index,
                                              "\""));
  }
  if (s.index_bits != 16 && s.index_bits != 8 && s.index_bits != 4) {
    return SettingError("index_bits", absl::StrCat("must be 16, 8 or 4, got ", s.index_bits));
  }
  if (s.query != "previous" && s.query != "after-attention" && s.query != "real") {
    return SettingError("query", absl::StrCat("must be \"previous\", \"after-attention\" or \"real\", got \"",
                                              s.query, "\""));
  }
  if (!(s.threshold >= 0 && s.threshold <= 1)) {
    return SettingError("threshold", absl::StrCat("must be in [0, 1], got ", s.threshold));
  }
  if (s.query_rows < 1 || s.query_rows > 1024) {
    return SettingError("query_rows", absl::StrCat("must be in [1, 1024], got ", s.query_rows));
  }
  if (s.max_quant_layers > c.n_layers) {
    return SettingError("max_quant_layers", absl::StrCat("must be <= the model's ", c.n_layers,
                                                         " layers (unset: no limit), got ",
                                                         s.max_quant_layers));
  }
  if (s.min_index_recall > 1) {
    return SettingError("min_index_recall",
                        absl::StrCat("must be in [0, 1] (unset: keep channels), got ",
                                     s.min_index_recall));
  }
  if (s.max_sparse_error > 1e6) {
    return SettingError("max_sparse_error",
                        absl::StrCat("must be a relative error in [0, 1e6] (unset: keep top_k), got ",
                                     s.max_sparse_error));
  }
  if (s.max_top_k < 0) {
    return SettingError("max_top_k",
                        absl::StrCat("must be >= 0 (0 = 4 x top_k), got ", s.max_top_k));
  }
  if (s.max_channels < 0 || s.max_channels > c.head_dim) {
    return SettingError("max_channels", absl::StrCat("must be in [0, head_dim ", c.head_dim,
                                                     "] (0 = 4 x channels), got ", s.max_channels));
  }
  const int64_t budget = static_cast<int64_t>(s.sink) + s.recent + s.top_k;
  if (budget + s.query_rows >= calibration_tokens) {
    return SettingError(
        "top_k",
        absl::StrCat("the sparse budget sink + recent + top_k = ", budget, " plus query_rows ",
                     s.query_rows, " must be below the calibration's ", calibration_tokens,
                     " tokens (otherwise Top-K keeps every token and measures nothing); "
                     "give more calibration text or a smaller budget"));
  }
  return absl::OkStatus();
}

absl::StatusOr<LayerScores> ScoreLayer(const Backend::LayerTap& tap, const model::ModelConfig& c,
                                       const PlanSettings& s, int threads) {
  const int n = tap.n_keys, Q = tap.n_queries, hd = c.head_dim, nh = c.n_heads,
            nkv = c.n_kv_heads, G = nh / nkv;
  if (Q != s.query_rows || tap.first_query + Q != n) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer %d: the tap holds queries [%d, %d) of %d keys; scoring needs the last %d",
        tap.layer, tap.first_query, tap.first_query + Q, n, s.query_rows));
  }
  if (auto st = ValidatePlanSettings(s, c, n); !st.ok()) return st;
  const int P = n - Q;  // the prompt; the tapped rows are the decode steps
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  auto qrow = [&](int i, int h) { return tap.q + (static_cast<int64_t>(i) * nh + h) * hd; };
  auto kbase = [&](int g) { return tap.k + g * tap.kv_head_stride; };
  auto vbase = [&](int g) { return tap.v + g * tap.kv_head_stride; };
  if (threads <= 0) threads = omp_get_max_threads();
  threads = tailorkv::OpenMpTeamSize(threads);

  LayerScores out;
  out.layer = tap.layer;
  out.head_preference.assign(nh, 0);
  const int top = static_cast<int>(std::floor(0.05 * n));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int h = 0; h < nh; ++h) {
    std::vector<double> p;
    double acc = 0;
    for (int i = 0; i < Q; ++i) acc += MassOutsideTop(qrow(i, h), kbase(h / G), n, hd, scale, top, p);
    out.head_preference[h] = acc / Q;
  }
  out.dense_preference =
      std::accumulate(out.head_preference.begin(), out.head_preference.end(), 0.0) / nh;

  // Full-precision outputs, and the sparse policy at each candidate d_s, per
  // KV head.
  const std::vector<int> ds = ChannelCandidates(s, hd);
  const std::vector<int> bits = BitCandidates(s);
  const int nd = static_cast<int>(ds.size()), dmax = ds.back();
  std::vector<double> full(static_cast<size_t>(Q) * nh * hd);
  std::vector<double> sparse_err(static_cast<size_t>(nkv) * nd, 0), recall(sparse_err.size(), 0),
      oracle_err(nkv, 0);
  // Per-layer budgets: each candidate Top-K with the index at ds[0] and exact.
  const std::vector<int> kb = TopKCandidates(s, n);
  const int nb = static_cast<int>(kb.size());
  const bool sweep = s.max_sparse_error >= 0;
  std::vector<double> budget_err(static_cast<size_t>(nkv) * nb, 0), budget_oracle(budget_err.size(), 0);
  // Index formats (index_study): bf16, fp8, int4 at ds[0] channels; int4
  // of all channels; 2-bit codes of all channels, per token (asymmetric,
  // min and step per token) or KIVI's way for keys (per channel, groups of
  // 64 tokens); 4-bit codes of all channels KIVI's way; 4-bit codes of the
  // ds[0] channels KIVI's way.
  constexpr int kFormats = 8;
  constexpr int kKiviGroup = 64;
  std::vector<double> format_err(static_cast<size_t>(nkv) * kFormats, 0),
      format_recall(format_err.size(), 0);
  const int S = std::min(s.sink, P);
  const int recent_lo = std::max(S, P - s.recent);
  const int nc = recent_lo - S;  // candidates [S, recent_lo)
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int g = 0; g < nkv; ++g) {
    const float* K = kbase(g);
    const float* V = vbase(g);
    std::vector<float> max_abs(hd, 0.0f);
    for (int j = 0; j < P; ++j) {
      for (int x = 0; x < hd; ++x) max_abs[x] = std::max(max_abs[x], std::fabs(K[j * hd + x]));
    }
    std::vector<float> q_mean(hd), q_ch(dmax), cand(static_cast<size_t>(nc) * dmax), approx(nc),
        exact(nc);
    std::vector<int32_t> sel(std::min(s.top_k, nc)), best(sel.size());
    std::vector<int> rows_full, rows_sparse, rows_oracle;
    std::vector<double> w, o_s(hd);
    // Budget and format measurements (reused across query rows).
    std::vector<int32_t> picked(std::max(sel.size(), static_cast<size_t>(std::min(kb.back(), nc))));
    std::vector<int> picked_rows;
    std::vector<float> fmt_q(s.index_study ? hd : 0), fmt_scores(s.index_study ? nc : 0),
        fmt_rows(s.index_study ? static_cast<size_t>(nc) * hd : 0);
    // Per candidate d: the channels (index "gpu": fixed at the first step).
    std::vector<std::vector<int32_t>> chans(nd);
    bool chosen = false;
    for (int i = 0; i < Q; ++i) {
      const int p = P + i;
      std::fill(q_mean.begin(), q_mean.end(), 0.0f);
      for (int a = 0; a < G; ++a) {
        for (int x = 0; x < hd; ++x) q_mean[x] += qrow(i, g * G + a)[x];
      }
      for (float& x : q_mean) x /= static_cast<float>(G);
      for (int j = 0; j < nc; ++j) {
        float e = 0;
        for (int x = 0; x < hd; ++x) e += q_mean[x] * K[(S + j) * hd + x];
        exact[j] = e;
      }
      const int ks = *runtime::TopKIndices(exact.data(), nc, s.top_k, best.data());
      rows_full.resize(p + 1);
      std::iota(rows_full.begin(), rows_full.end(), 0);
      // The rows a step attends with `m` picked candidates: sink, picked,
      // recent prompt and generated.
      auto kept_m = [&](const int32_t* picked, int m, std::vector<int>& rows) {
        rows.clear();
        for (int j = 0; j < S; ++j) rows.push_back(j);
        for (int a = 0; a < m; ++a) rows.push_back(S + picked[a]);
        for (int j = recent_lo; j <= p; ++j) rows.push_back(j);
      };
      auto kept = [&](const std::vector<int32_t>& picked, std::vector<int>& rows) {
        kept_m(picked.data(), ks, rows);
      };
      // Summed relative error of the group's query heads attending `rows`.
      auto group_error = [&](const std::vector<int>& rows) {
        double e = 0;
        for (int a = 0; a < G; ++a) {
          const int h = g * G + a;
          AttendRows(qrow(i, h), K, V, rows, hd, scale, w, o_s.data());
          e += RelativeError(o_s.data(), &full[(static_cast<size_t>(i) * nh + h) * hd], hd);
        }
        return e;
      };
      kept(best, rows_oracle);
      for (int a = 0; a < G; ++a) {
        const int h = g * G + a;
        AttendRows(qrow(i, h), K, V, rows_full, hd, scale, w,
                   &full[(static_cast<size_t>(i) * nh + h) * hd]);
      }
      oracle_err[g] += group_error(rows_oracle);
      if (!chosen || s.index == "faithful") {
        for (int c = 0; c < nd; ++c) {
          chans[c].resize(ds[c]);
          (void)runtime::ChooseChannels(q_mean.data(), max_abs.data(), hd, ds[c], chans[c].data());
        }
        chosen = true;
      }
      for (int c = 0; c < nd; ++c) {
        const int d = ds[c];
        const std::vector<int32_t>& ch = chans[c];
        // The index as the plan stores it (FP8 entries for index_bits 8,
        // 4-bit blocks of kIndexBlock absolute positions for 4).
        const bool fp8 = s.index == "gpu" && s.index_bits == 8;
        for (int j = 0; j < nc; ++j) {
          for (int x = 0; x < d; ++x) {
            const float k = K[(S + j) * hd + ch[x]];
            cand[j * d + x] = fp8 ? runtime::Fp8E4M3ToFloat(runtime::FloatToFp8E4M3(k)) : k;
          }
        }
        if (s.index == "gpu" && s.index_bits == 4) {
          for (int j0 = 0; j0 < nc;) {
            const int n = std::min(nc - j0, runtime::kIndexBlock - (S + j0) % runtime::kIndexBlock);
            for (int x = 0; x < d; ++x) runtime::RoundIndexBlock4(&cand[static_cast<size_t>(j0) * d + x], n, d);
            j0 += n;
          }
        }
        for (int x = 0; x < d; ++x) q_ch[x] = q_mean[ch[x]];
        runtime::ScoreOnChannels(q_ch.data(), d, cand.data(), nc, approx.data());
        (void)runtime::TopKIndices(approx.data(), nc, s.top_k, sel.data());
        int hit = 0;
        for (int a = 0, b = 0; a < ks && b < ks;) {  // both ascending
          if (sel[a] == best[b]) ++hit, ++a, ++b;
          else if (sel[a] < best[b]) ++a;
          else ++b;
        }
        recall[g * nd + c] += ks > 0 ? static_cast<double>(hit) / ks : 1.0;
        if (c == 0 && s.index_study) {
          // The same index with its entries rounded to each format, then
          // scored and selected as the runtime does.
          for (int f = 0; f < kFormats; ++f) {
            const bool all = f >= 3 && f <= 6;
            const int dd = all ? hd : d;
            for (int j = 0; j < nc; ++j) {
              float* row = &fmt_rows[static_cast<size_t>(j) * dd];
              for (int x = 0; x < dd; ++x) row[x] = K[(S + j) * hd + (all ? x : ch[x])];
              if (f == 4) {
                // Per token: z = min, step = (max - min) / 3, codes 0..3.
                float lo = row[0], hi = row[0];
                for (int x = 0; x < dd; ++x) lo = std::min(lo, row[x]), hi = std::max(hi, row[x]);
                const float z = RoundToBf16(lo), st = RoundToBf16((hi - lo) / 3.0f);
                for (int x = 0; x < dd; ++x) {
                  row[x] = st > 0 ? z + std::clamp(std::nearbyint((row[x] - z) / st), 0.0f, 3.0f) * st : z;
                }
              } else if (f >= 5) {
                continue;  // per channel over token groups: below, once all rows are in
              } else if (f == 0) {
                for (int x = 0; x < dd; ++x) row[x] = RoundToBf16(row[x]);
              } else if (f == 1) {
                for (int x = 0; x < dd; ++x) row[x] = runtime::Fp8E4M3ToFloat(runtime::FloatToFp8E4M3(row[x]));
              } else {
                float m = 0;
                for (int x = 0; x < dd; ++x) m = std::max(m, std::fabs(row[x]));
                const float scale = RoundToBf16(m / 7.0f);
                for (int x = 0; x < dd; ++x) {
                  row[x] = scale > 0 ? std::clamp(std::nearbyint(row[x] / scale), -7.0f, 7.0f) * scale : 0.0f;
                }
              }
            }
            if (f >= 5) {
              // KIVI keys: per channel, groups of kKiviGroup positions
              // (absolute, as a cache packs them), asymmetric, 2 or 4 bits.
              const float levels = f == 5 ? 3.0f : 15.0f;  // 6, 7: 4 bits
              for (int j0 = 0; j0 < nc;) {
                const int gend = std::min(nc, j0 + kKiviGroup - (S + j0) % kKiviGroup);
                for (int x = 0; x < dd; ++x) {
                  float lo = fmt_rows[static_cast<size_t>(j0) * dd + x], hi = lo;
                  for (int j = j0; j < gend; ++j) {
                    const float v = fmt_rows[static_cast<size_t>(j) * dd + x];
                    lo = std::min(lo, v), hi = std::max(hi, v);
                  }
                  const float z = RoundToBf16(lo), st = RoundToBf16((hi - lo) / levels);
                  for (int j = j0; j < gend; ++j) {
                    float& v = fmt_rows[static_cast<size_t>(j) * dd + x];
                    v = st > 0 ? z + std::clamp(std::nearbyint((v - z) / st), 0.0f, levels) * st : z;
                  }
                }
                j0 = gend;
              }
            }
            for (int x = 0; x < dd; ++x) fmt_q[x] = q_mean[all ? x : ch[x]];
            runtime::ScoreOnChannels(fmt_q.data(), dd, fmt_rows.data(), nc, fmt_scores.data());
            const int m = *runtime::TopKIndices(fmt_scores.data(), nc, s.top_k, picked.data());
            int hit = 0;
            for (int a = 0, b = 0; a < m && b < ks;) {
              if (picked[a] == best[b]) ++hit, ++a, ++b;
              else if (picked[a] < best[b]) ++a;
              else ++b;
            }
            format_recall[g * kFormats + f] += ks > 0 ? static_cast<double>(hit) / ks : 1.0;
            kept_m(picked.data(), m, picked_rows);
            format_err[g * kFormats + f] += group_error(picked_rows);
          }
        }
        if (c == 0 && sweep) {
          // The same scores under each candidate budget, index and exact.
          for (int bi = 0; bi < nb; ++bi) {
            for (int which = 0; which < 2; ++which) {
              const int m = *runtime::TopKIndices(which == 0 ? approx.data() : exact.data(), nc,
                                                  kb[bi], picked.data());
              kept_m(picked.data(), m, picked_rows);
              (which == 0 ? budget_err : budget_oracle)[g * nb + bi] += group_error(picked_rows);
            }
          }
        }
        kept(sel, rows_sparse);
        sparse_err[g * nd + c] += group_error(rows_sparse);
      }
    }
  }
  const double per_head_rows = static_cast<double>(Q) * nh;
  out.sparse_oracle_error =
      std::accumulate(oracle_err.begin(), oracle_err.end(), 0.0) / per_head_rows;
  for (int c = 0; c < nd; ++c) {
    double e = 0, r = 0;
    for (int g = 0; g < nkv; ++g) e += sparse_err[g * nd + c], r += recall[g * nd + c];
    out.by_channels.push_back(
        {.channels = ds[c], .sparse_error = e / per_head_rows, .recall = r / (Q * nkv)});
  }
  out.sparse_error = out.by_channels[0].sparse_error;
  out.index_recall = out.by_channels[0].recall;
  if (s.index_study) {
    const char* names[kFormats] = {"bf16",     "fp8",           "int4",          "int4-all",
                                   "int2-all", "int2-all-kivi", "int4-all-kivi", "int4-kivi"};
    const int d0 = ds[0];
    // Per token and KV head; the KIVI formats' fp16 zero and step per
    // channel per 64 tokens add hd * 4 / 64 bytes.
    const double bytes[kFormats] = {2.0 * d0,       1.0 * d0,          0.5 * d0 + 2,
                                    0.5 * hd + 2,   0.25 * hd + 4,     0.25 * hd + hd / 16.0,
                                    0.5 * hd + hd / 16.0, 0.5 * d0 + d0 / 16.0};
    for (int f = 0; f < kFormats; ++f) {
      double e = 0, r = 0;
      for (int g = 0; g < nkv; ++g) e += format_err[g * kFormats + f], r += format_recall[g * kFormats + f];
      out.by_index_format.push_back({.format = names[f],
                                     .channels = f >= 3 && f <= 6 ? hd : d0,
                                     .bytes_per_token = bytes[f],
                                     .recall = r / (Q * nkv),
                                     .sparse_error = e / per_head_rows});
    }
  }
  if (sweep) {
    for (int bi = 0; bi < nb; ++bi) {
      double e = 0, o = 0;
      for (int g = 0; g < nkv; ++g) e += budget_err[g * nb + bi], o += budget_oracle[g * nb + bi];
      out.by_top_k.push_back({.top_k = kb[bi],
                              .sparse_error = e / per_head_rows,
                              .oracle_error = o / per_head_rows});
    }
  }

  // Quantization at each candidate width: the runtime's own store, packed
  // with the prompt, then each step appended and attended as a quant layer's
  // decode does.
  for (int b : bits) {
    const runtime::QuantShape shape{
        .n_kv_heads = nkv,
        .head_dim = hd,
        .capacity = n,
        .params = {.bits = b, .group = s.quant_group, .residual = s.quant_residual}};
    if (auto st = shape.Validate(); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("settings: quantization: ", st.message()));
    }
    runtime::QuantKvCpu store(shape);
    store.Pack(tap.k, tap.v, tap.kv_head_stride, 0, P);
    std::vector<float> k_row(static_cast<size_t>(nkv) * hd), v_row(k_row.size());
    std::vector<double> quant_err(nh, 0);
    for (int i = 0; i < Q; ++i) {
      const int p = P + i;
      for (int g = 0; g < nkv; ++g) {
        std::copy_n(kbase(g) + static_cast<int64_t>(p) * hd, hd, &k_row[g * hd]);
        std::copy_n(vbase(g) + static_cast<int64_t>(p) * hd, hd, &v_row[g * hd]);
      }
      store.Append(p, k_row.data(), v_row.data());
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int h = 0; h < nh; ++h) {
        std::vector<float> scores(p + 1), o(hd);
        store.AttendHead(qrow(i, h), h / G, p + 1, static_cast<float>(scale), scores.data(),
                         o.data());
        std::vector<double> od(o.begin(), o.end());
        quant_err[h] +=
            RelativeError(od.data(), &full[(static_cast<size_t>(i) * nh + h) * hd], hd);
      }
    }
    out.by_bits.push_back(
        {.bits = b,
         .quant_error = std::accumulate(quant_err.begin(), quant_err.end(), 0.0) / per_head_rows});
  }
  out.quant_error = out.by_bits[0].quant_error;
  return out;
}

runtime::KvPlan DecidePlan(const std::vector<LayerScores>& scores, const PlanSettings& s) {
  runtime::KvPlan plan;
  const int n = static_cast<int>(scores.size());
  std::vector<int> quant;
  for (int l = 0; l < n; ++l) {
    if (RoundScore(scores[l].dense_preference) > s.threshold) quant.push_back(l);
  }
  if (s.max_quant_layers >= 0 && static_cast<int>(quant.size()) > s.max_quant_layers) {
    std::stable_sort(quant.begin(), quant.end(), [&](int a, int b) {
      return RoundScore(scores[a].dense_preference) > RoundScore(scores[b].dense_preference);
    });
    quant.resize(s.max_quant_layers);
  }
  plan.layers.resize(n);
  for (int l = 0; l < n; ++l) {
    runtime::LayerKvPolicy& p = plan.layers[l];
    const LayerScores& sc = scores[l];
    // The fewest bits that meet max_quant_error, the fewest channels that
    // meet min_index_recall (the last candidate when none does).
    LayerScores::ByBits b = sc.by_bits.empty() ? LayerScores::ByBits{s.quant_bits, sc.quant_error}
                                               : sc.by_bits.back();
    for (const auto& c : sc.by_bits) {
      if (c.quant_error <= s.max_quant_error || s.max_quant_error < 0) {
        b = c;
        break;
      }
    }
    LayerScores::ByChannels d =
        sc.by_channels.empty()
            ? LayerScores::ByChannels{s.channels, sc.sparse_error, sc.index_recall}
            : sc.by_channels.back();
    for (const auto& c : sc.by_channels) {
      if (c.recall >= s.min_index_recall || s.min_index_recall < 0) {
        d = c;
        break;
      }
    }
    // The fewest Top-K tokens that meet max_sparse_error (the largest when
    // none does).
    int top_k = s.top_k;
    double sparse_error = d.sparse_error;
    if (s.max_sparse_error >= 0 && !sc.by_top_k.empty()) {
      const LayerScores::ByTopK* k = &sc.by_top_k.back();
      for (const auto& c : sc.by_top_k) {
        if (c.sparse_error <= s.max_sparse_error) {
          k = &c;
          break;
        }
      }
      top_k = k->top_k;
      sparse_error = k->sparse_error;
    }
    if (std::find(quant.begin(), quant.end(), l) != quant.end()) {
      p.kind = runtime::KvPolicyKind::kQuant;
      p.quant = {.bits = b.bits, .group = s.quant_group, .residual = s.quant_residual};
    } else {
      p.kind = runtime::KvPolicyKind::kSparse;
      p.sparse.sink = s.sink;
      p.sparse.recent = s.recent;
      p.sparse.top_k = top_k;
      p.sparse.channels = d.channels;
      p.sparse.index = s.index;
      // The index's entry format and query are index "gpu"'s alone.
      if (s.index == "gpu") {
        p.sparse.index_bits = s.index_bits;
        p.sparse.query = s.query;
      }
    }
    p.dense_preference = RoundScore(sc.dense_preference);
    p.sparse_error = RoundScore(sparse_error);
    p.quant_error = RoundScore(b.quant_error);
  }
  return plan;
}

}  // namespace tailorkv::profiler
