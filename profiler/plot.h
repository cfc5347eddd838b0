// Renders the per-layer "sparse error vs quantization error" picture that an
// operator reads before a layer plan, as PNG bytes, plus the minimal PNG
// encoder it is built on. No plotting or image library: a raster canvas, an
// embedded 5x7 bitmap font (ASCII 32..126) and zlib for the IDAT stream.
//
// The picture (same input -> byte-identical output):
//  - title (2x font) and a legend row;
//  - top panel: per layer two side-by-side bars, sparse error (orange, left)
//    and quantization error (blue, right), on a log10 axis covering the data
//    in whole decades (a zero error is clamped to the axis bottom, i.e. no
//    bar), with a gridline and a "1e-3"-style label at each decade;
//  - under each layer's bars the plan's policy letter Q / S / D in the
//    policy's colour (blue / orange / green), then the layer number (every
//    layer up to 40 layers, else every 4th; sparser when they would overlap);
//  - bottom panel: dense-preference score per layer as grey bars on a linear
//    0..1 axis, with a dashed red line at options.threshold.
//
// Stateless and thread-safe. Never reads the environment or writes files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tailorkv::profiler {

// One layer's measurements and the plan's choice for it.
struct LayerErrorPoint {
  int layer = 0;                  // 0..n-1, in order (points[i].layer == i)
  char policy = 'd';              // 'q' quant, 's' sparse, 'd' dense (what the plan chose)
  double dense_preference = 0.0;  // TailorKV score in [0, 1]
  double sparse_error = 0.0;      // relative L2 error of attention output, finite, >= 0
  double quant_error = 0.0;       // relative L2 error of attention output, finite, >= 0
};

struct PlotOptions {
  std::string title;  // drawn as is; bytes outside ASCII 32..126 show as '?', clipped at the edge
  double threshold = 0.2;  // dense-preference threshold line, in [0, 1]
  // Image size in pixels; 0 = auto: width max(640, 64 + 24 * layers) (at most
  // kMaxPlotSide), height 480. An explicit size must be <= kMaxPlotSide, width
  // >= kPlotMarginX + kMinPixelsPerLayer * layers and >= kMinPlotWidth, height
  // >= kMinPlotHeight.
  int width = 0;
  int height = 0;
};

inline constexpr int kMinPlotWidth = 200;
inline constexpr int kMinPlotHeight = 240;
inline constexpr int kMaxPlotSide = 16384;
// Left + right margins around the panels, and the narrowest slot that still
// holds two bars and a policy letter.
inline constexpr int kPlotMarginX = 64;
inline constexpr int kMinPixelsPerLayer = 6;

// Returns RGB 8-bit PNG bytes. InvalidArgument naming the field (e.g.
// "points[3].sparse_error: must be finite and >= 0, got nan") for empty
// input, layers out of order, NaN/inf/negative errors, a dense_preference or
// threshold outside [0, 1], an unknown policy, or a size too small (or too
// large) to draw.
absl::StatusOr<std::string> RenderLayerErrorPlot(const std::vector<LayerErrorPoint>& points,
                                                 const PlotOptions& options);

// Minimal PNG encoder: signature, IHDR (8-bit RGB, no interlace), one IDAT
// holding the zlib stream of rows each prefixed by filter byte 0, IEND; every
// chunk with its CRC. rgb is row-major, top row first, 3 bytes per pixel, and
// rgb.size() must equal width * height * 3. InvalidArgument for width or
// height outside [1, kMaxPlotSide] or a size mismatch; Internal if zlib fails.
absl::StatusOr<std::string> EncodePngRgb(int width, int height, const std::vector<uint8_t>& rgb);

}  // namespace tailorkv::profiler
