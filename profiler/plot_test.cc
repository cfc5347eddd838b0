#include "profiler/plot.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tailorkv::profiler {
namespace {

struct Png {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // row-major, 3 bytes per pixel

  bool Is(int x, int y, uint8_t r, uint8_t g, uint8_t b) const {
    const uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
    return p[0] == r && p[1] == g && p[2] == b;
  }
};

struct Colour {
  uint8_t r, g, b;
};
// The palette of plot.cc.
constexpr Colour kOrange{255, 127, 14};
constexpr Colour kBlue{31, 119, 180};
constexpr Colour kGreen{44, 160, 44};
constexpr Colour kGreyBar{150, 150, 150};
constexpr Colour kRed{214, 39, 40};

bool Is(const Png& png, int x, int y, Colour c) { return png.Is(x, y, c.r, c.g, c.b); }

uint32_t BigEndian32(std::string_view s, size_t at) {
  return (uint32_t{static_cast<uint8_t>(s[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(s[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(s[at + 2])} << 8) | uint32_t{static_cast<uint8_t>(s[at + 3])};
}

// An independent reader for exactly what EncodePngRgb promises: signature,
// IHDR first (8-bit RGB, no interlace), IDAT(s), IEND last, every CRC valid,
// the inflated stream exactly height rows of 1 + 3 * width bytes, each with
// filter byte 0.
absl::StatusOr<Png> DecodePng(std::string_view bytes) {
  static constexpr std::string_view kSignature("\x89PNG\r\n\x1a\n", 8);
  if (bytes.substr(0, 8) != kSignature) return absl::DataLossError("bad signature");
  Png png;
  std::string idat;
  bool seen_ihdr = false, seen_iend = false;
  size_t at = 8;
  while (at < bytes.size()) {
    if (seen_iend) return absl::DataLossError("bytes after IEND");
    if (bytes.size() - at < 12) return absl::DataLossError(absl::StrCat("truncated chunk at ", at));
    const uint32_t len = BigEndian32(bytes, at);
    if (bytes.size() - at - 12 < len) return absl::DataLossError("chunk overruns the file");
    const std::string_view type = bytes.substr(at + 4, 4);
    const std::string_view data = bytes.substr(at + 8, len);
    const uint32_t stored_crc = BigEndian32(bytes, at + 8 + len);
    const uLong crc =
        crc32(0L, reinterpret_cast<const Bytef*>(bytes.data() + at + 4), static_cast<uInt>(4 + len));
    if (crc != stored_crc) return absl::DataLossError(absl::StrCat("bad CRC in ", std::string(type)));
    if (!seen_ihdr && type != "IHDR") return absl::DataLossError("first chunk is not IHDR");
    if (type == "IHDR") {
      if (seen_ihdr || len != 13) return absl::DataLossError("bad IHDR");
      seen_ihdr = true;
      png.width = static_cast<int>(BigEndian32(data, 0));
      png.height = static_cast<int>(BigEndian32(data, 4));
      if (data[8] != 8 || data[9] != 2 || data[10] != 0 || data[11] != 0 || data[12] != 0) {
        return absl::DataLossError("IHDR is not 8-bit RGB, deflate, filter 0, no interlace");
      }
      if (png.width <= 0 || png.height <= 0) return absl::DataLossError("empty image");
    } else if (type == "IDAT") {
      idat.append(data);
    } else if (type == "IEND") {
      if (len != 0) return absl::DataLossError("IEND with data");
      seen_iend = true;
    } else {
      return absl::DataLossError(absl::StrCat("unexpected chunk ", std::string(type)));
    }
    at += 12 + len;
  }
  if (!seen_iend) return absl::DataLossError("no IEND");
  const size_t row = 1 + size_t{3} * png.width;
  const size_t expected = row * png.height;
  std::string raw(expected + 1, '\0');  // one spare byte: a longer stream must show up
  uLongf raw_size = raw.size();
  const int rc = uncompress(reinterpret_cast<Bytef*>(raw.data()), &raw_size,
                            reinterpret_cast<const Bytef*>(idat.data()), idat.size());
  if (rc != Z_OK) return absl::DataLossError(absl::StrCat("uncompress: ", rc));
  if (raw_size != expected) {
    return absl::DataLossError(absl::StrCat("inflated ", raw_size, " bytes, expected ", expected));
  }
  png.rgb.reserve(expected - png.height);
  for (int y = 0; y < png.height; ++y) {
    if (raw[row * y] != 0) return absl::DataLossError(absl::StrCat("row ", y, " filter != 0"));
    png.rgb.insert(png.rgb.end(), raw.begin() + row * y + 1, raw.begin() + row * (y + 1));
  }
  return png;
}

Png RenderAndDecode(const std::vector<LayerErrorPoint>& points, const PlotOptions& options) {
  absl::StatusOr<std::string> bytes = RenderLayerErrorPlot(points, options);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  if (!bytes.ok()) return {};
  absl::StatusOr<Png> png = DecodePng(*bytes);
  EXPECT_TRUE(png.ok()) << png.status();
  return png.ok() ? *std::move(png) : Png{};
}

// Longest vertical run of colour c in column x: a bar's height, ignoring
// the few pixels of a letter or the legend swatch in the same column.
int LongestVerticalRun(const Png& png, int x, Colour c) {
  int best = 0, run = 0;
  for (int y = 0; y < png.height; ++y) {
    run = Is(png, x, y, c) ? run + 1 : 0;
    best = std::max(best, run);
  }
  return best;
}

struct Bar {
  int x_begin, x_end, height;
};

// Bars of colour c, left to right: maximal column ranges whose vertical run
// of c is at least min_height (taller than any glyph or swatch: 7 rows).
std::vector<Bar> FindBars(const Png& png, Colour c, int min_height = 9) {
  std::vector<Bar> bars;
  for (int x = 0; x < png.width; ++x) {
    const int h = LongestVerticalRun(png, x, c);
    if (h < min_height) continue;
    if (!bars.empty() && bars.back().x_end == x) {
      bars.back().x_end = x + 1;
      bars.back().height = std::max(bars.back().height, h);
    } else {
      bars.push_back({x, x + 1, h});
    }
  }
  return bars;
}

int64_t CountColour(const Png& png, Colour c) {
  int64_t n = 0;
  for (int y = 0; y < png.height; ++y)
    for (int x = 0; x < png.width; ++x) n += Is(png, x, y, c);
  return n;
}

PlotOptions Options(std::string title = "", double threshold = 0.2, int width = 0, int height = 0) {
  PlotOptions o;
  o.title = std::move(title);
  o.threshold = threshold;
  o.width = width;
  o.height = height;
  return o;
}

LayerErrorPoint Point(int layer, char policy, double pref, double sparse, double quant) {
  return {layer, policy, pref, sparse, quant};
}

TEST(EncodePngRgbTest, RoundTripsOddSizeImageExactly) {
  std::mt19937 rng(7);
  for (auto [w, h] : {std::pair{1, 1}, std::pair{7, 3}, std::pair{33, 17}}) {
    std::vector<uint8_t> rgb(size_t{3} * w * h);
    for (auto& v : rgb) v = static_cast<uint8_t>(rng());
    absl::StatusOr<std::string> bytes = EncodePngRgb(w, h, rgb);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    absl::StatusOr<Png> png = DecodePng(*bytes);
    ASSERT_TRUE(png.ok()) << png.status();
    EXPECT_EQ(png->width, w);
    EXPECT_EQ(png->height, h);
    EXPECT_EQ(png->rgb, rgb);
  }
}

TEST(EncodePngRgbTest, DecoderCatchesACorruptedByte) {
  const std::vector<uint8_t> rgb(3 * 4 * 2, 200);
  absl::StatusOr<std::string> bytes = EncodePngRgb(4, 2, rgb);
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE(DecodePng(*bytes).ok());
  std::string bad = *bytes;
  bad[20] ^= 1;  // inside IHDR's data: its CRC must no longer match
  EXPECT_FALSE(DecodePng(bad).ok());
}

TEST(EncodePngRgbTest, RejectsBadSizes) {
  EXPECT_EQ(EncodePngRgb(0, 1, {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePngRgb(1, -1, {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePngRgb(kMaxPlotSide + 1, 1, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::Status short_rgb = EncodePngRgb(2, 2, std::vector<uint8_t>(11)).status();
  EXPECT_EQ(short_rgb.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(short_rgb.message().find("rgb.size()"), std::string_view::npos) << short_rgb;
}

TEST(RenderLayerErrorPlotTest, AutoSizeFollowsLayerCount) {
  for (auto [layers, width] : {std::pair{1, 640}, std::pair{12, 640}, std::pair{80, 64 + 24 * 80}}) {
    std::vector<LayerErrorPoint> points;
    for (int i = 0; i < layers; ++i) points.push_back(Point(i, "qsd"[i % 3], 0.5, 0.1, 0.01));
    const Png png = RenderAndDecode(points, {});
    EXPECT_EQ(png.width, width) << layers << " layers";
    EXPECT_EQ(png.height, 480) << layers << " layers";
  }
  const Png sized = RenderAndDecode({Point(0, 'q', 0.5, 0.1, 0.01)}, Options("", 0.2, 301, 257));
  EXPECT_EQ(sized.width, 301);
  EXPECT_EQ(sized.height, 257);
}

TEST(RenderLayerErrorPlotTest, BarsFollowTheLogScaleAndZeroHasNoBar) {
  // Axis: smallest nonzero 1e-3 -> bottom 1e-4; largest 0.5 -> top 1e0.
  const std::vector<LayerErrorPoint> points = {
      Point(0, 'd', 0.7, 1e-2, 1e-2),
      Point(1, 's', 0.1, 0.5, 1e-3),  // sparse error huge, quant tiny
      Point(2, 'q', 0.9, 1e-2, 1e-2),
      Point(3, 'q', 0.9, 0.0, 0.05),  // zero sparse error: clamped, no bar
  };
  const Png png = RenderAndDecode(points, Options("bars"));
  const std::vector<Bar> orange = FindBars(png, kOrange);
  const std::vector<Bar> blue = FindBars(png, kBlue);
  ASSERT_EQ(orange.size(), 3u);
  ASSERT_EQ(blue.size(), 4u);
  for (int i = 0; i < 3; ++i) {
    // Each layer's sparse bar sits immediately left of its quant bar.
    EXPECT_EQ(orange[i].x_end, blue[i].x_begin) << "layer " << i;
    EXPECT_EQ(orange[i].x_end - orange[i].x_begin, blue[i].x_end - blue[i].x_begin);
  }
  // Equal errors, equal bars (the tallest bar wins a shared column of letter pixels).
  EXPECT_NEAR(orange[0].height, blue[0].height, 1);
  EXPECT_NEAR(orange[2].height, blue[2].height, 1);
  // log10 heights over the axis bottom: 0.5 -> 3.70 decades, 1e-3 -> 1, 1e-2 -> 2.
  EXPECT_GT(orange[1].height, 3 * blue[1].height);
  EXPECT_NEAR(static_cast<double>(orange[1].height) / blue[1].height, 3.70, 0.1);
  EXPECT_NEAR(static_cast<double>(orange[0].height) / blue[1].height, 2.0, 0.05);
  EXPECT_GT(orange[1].height, orange[0].height + 40);
}

TEST(RenderLayerErrorPlotTest, ThresholdLineIsRedAtTheThresholdRow) {
  const std::vector<LayerErrorPoint> points = {
      Point(0, 'q', 1.0, 0.1, 0.01),  // full-height grey bar: the panel's extent
      Point(1, 's', 0.0, 0.1, 0.01),
      Point(2, 'd', 0.6, 0.1, 0.01),
  };
  int previous_row = -1;
  for (double threshold : {0.3, 0.8}) {
    const Png png = RenderAndDecode(points, Options("", threshold));
    int grey_top = png.height, grey_end = 0;
    for (int y = 0; y < png.height; ++y)
      for (int x = 0; x < png.width; ++x)
        if (Is(png, x, y, kGreyBar)) {
          grey_top = std::min(grey_top, y);
          grey_end = std::max(grey_end, y + 1);
        }
    ASSERT_LT(grey_top, grey_end);
    const int panel_h = grey_end - grey_top;
    ASSERT_GT(panel_h, 50);
    const int row = grey_end - static_cast<int>(std::lround(threshold * panel_h));
    int red = 0, gaps = 0;
    for (int x = 1; x < png.width; ++x) {
      red += Is(png, x, row, kRed);
      gaps += Is(png, x - 1, row, kRed) && !Is(png, x, row, kRed);
    }
    EXPECT_GT(red, png.width / 3) << "threshold " << threshold;
    EXPECT_GT(gaps, 10) << "the line should be dashed";
    // Nowhere else inside the panel.
    for (int y = grey_top; y < grey_end; ++y) {
      if (y == row || y == row - 1) continue;
      for (int x = 0; x < png.width; ++x) ASSERT_FALSE(Is(png, x, y, kRed)) << x << "," << y;
    }
    EXPECT_NE(row, previous_row);
    previous_row = row;
  }
}

TEST(RenderLayerErrorPlotTest, PolicyLettersUseThePolicyColour) {
  auto render = [](char policy) {
    std::vector<LayerErrorPoint> points;
    for (int i = 0; i < 3; ++i) points.push_back(Point(i, policy, 0.5, 0.1, 0.01));
    return RenderAndDecode(points, {});
  };
  const Png quant = render('q');
  const Png dense = render('d');
  // Glyph pixel counts: 'Q' has 17, 'D' 16; three layers each.
  EXPECT_EQ(CountColour(quant, kBlue) - CountColour(dense, kBlue), 3 * 17);
  EXPECT_EQ(CountColour(dense, kGreen) - CountColour(quant, kGreen), 3 * 16);
}

TEST(RenderLayerErrorPlotTest, SameInputSameBytes) {
  std::vector<LayerErrorPoint> points;
  for (int i = 0; i < 9; ++i) points.push_back(Point(i, "qsd"[i % 3], i / 8.0, 0.3 / (i + 1), 1e-4 * i));
  const PlotOptions options = Options("SmolLM2 / 4k tokens", 0.25);
  absl::StatusOr<std::string> a = RenderLayerErrorPlot(points, options);
  absl::StatusOr<std::string> b = RenderLayerErrorPlot(points, options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  points[4].policy = 'd';
  absl::StatusOr<std::string> c = RenderLayerErrorPlot(points, options);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(*a, *c);
}

TEST(RenderLayerErrorPlotTest, EightyLayersKeepEveryBarSeparate) {
  std::vector<LayerErrorPoint> points;
  int nonzero_sparse = 0;
  for (int i = 0; i < 80; ++i) {
    const double sparse = i % 10 == 9 ? 0.0 : std::pow(10.0, -3.0 + 3.0 * (i % 7) / 6.0);
    nonzero_sparse += sparse > 0;
    points.push_back(Point(i, "qsd"[i % 3], (i % 11) / 10.0, sparse, std::pow(10.0, -2.0 + (i % 3))));
  }
  const Png png = RenderAndDecode(points, Options(std::string(300, 'x') + "\xc3\xa9\x01"));
  EXPECT_EQ(static_cast<int>(FindBars(png, kOrange).size()), nonzero_sparse);
  EXPECT_EQ(FindBars(png, kBlue).size(), 80u);
}

TEST(RenderLayerErrorPlotTest, SingleLayerAllZeroErrorsStillDraws) {
  const Png png = RenderAndDecode({Point(0, 'd', 0.0, 0.0, 0.0)}, {});
  EXPECT_EQ(png.width, 640);
  EXPECT_TRUE(FindBars(png, kOrange).empty());
  EXPECT_GT(CountColour(png, kRed), 100);  // threshold line and its label
}

TEST(RenderLayerErrorPlotTest, RejectsBadInputNamingTheField) {
  const std::vector<LayerErrorPoint> good = {Point(0, 'q', 0.5, 0.1, 0.01),
                                             Point(1, 's', 0.5, 0.1, 0.01),
                                             Point(2, 'd', 0.5, 0.1, 0.01)};
  ASSERT_TRUE(RenderLayerErrorPlot(good, {}).ok());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    std::string field;
    std::function<void(std::vector<LayerErrorPoint>&, PlotOptions&)> mutate;
  };
  const std::vector<Case> cases = {
      {"points:", [](auto& p, auto&) { p.clear(); }},
      {"points[1].layer", [](auto& p, auto&) { p[1].layer = 2; }},
      {"points[0].layer", [](auto& p, auto&) { p[0].layer = -1; }},
      {"points[2].sparse_error", [&](auto& p, auto&) { p[2].sparse_error = nan; }},
      {"points[1].sparse_error", [](auto& p, auto&) { p[1].sparse_error = -1e-9; }},
      {"points[0].quant_error", [&](auto& p, auto&) { p[0].quant_error = inf; }},
      {"points[1].policy", [](auto& p, auto&) { p[1].policy = 'x'; }},
      {"points[2].policy", [](auto& p, auto&) { p[2].policy = 'Q'; }},
      {"points[0].dense_preference", [](auto& p, auto&) { p[0].dense_preference = 1.5; }},
      {"points[2].dense_preference", [&](auto& p, auto&) { p[2].dense_preference = nan; }},
      {"options.threshold", [&](auto&, auto& o) { o.threshold = nan; }},
      {"options.threshold", [](auto&, auto& o) { o.threshold = -0.1; }},
      {"options.width", [](auto&, auto& o) { o.width = 100; }},
      {"options.width", [](auto&, auto& o) { o.width = -640; }},
      {"options.width", [](auto&, auto& o) { o.width = kMaxPlotSide + 1; }},
      {"options.height", [](auto&, auto& o) { o.height = kMinPlotHeight - 1; }},
      {"options.height", [](auto&, auto& o) { o.height = -1; }},
      {"options.width",  // 80 layers need 64 + 6 * 80 = 544 columns
       [](auto& p, auto& o) {
         p.clear();
         for (int i = 0; i < 80; ++i) p.push_back(Point(i, 'q', 0.5, 0.1, 0.01));
         o.width = 543;
       }},
  };
  for (const Case& c : cases) {
    std::vector<LayerErrorPoint> points = good;
    PlotOptions options;
    c.mutate(points, options);
    const absl::Status status = RenderLayerErrorPlot(points, options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field << ": " << status;
    EXPECT_NE(status.message().find(c.field), std::string_view::npos) << c.field << ": " << status;
  }
}

// Renders a 30-layer sample (SmolLM2-135M's layer count); writes it only when
// TAILORKV_PLOT_OUT names a file, so a person can look at it.
TEST(RenderLayerErrorPlotTest, SampleRendersAndIsWrittenOnlyWhenAsked) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<LayerErrorPoint> points;
  for (int i = 0; i < 30; ++i) {
    const double pref = i < 2 ? 0.05 + 0.05 * i : u(rng);
    const double sparse = std::pow(10.0, -2.5 + 2.0 * pref + 0.3 * u(rng));
    const double quant = i == 0 ? 0.0 : std::pow(10.0, -2.0 - 1.0 * pref + 0.3 * u(rng));
    const char policy = i < 2 ? 'd' : pref > 0.2 ? 'q' : 's';
    points.push_back(Point(i, policy, pref, sparse, quant));
  }
  const PlotOptions options = Options("SmolLM2-135M: sparse vs quant error per layer");
  absl::StatusOr<std::string> bytes = RenderLayerErrorPlot(points, options);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ASSERT_TRUE(DecodePng(*bytes).ok());
  const char* out = std::getenv("TAILORKV_PLOT_OUT");
  if (out == nullptr || *out == '\0') return;
  std::ofstream file(out, std::ios::binary);
  file.write(bytes->data(), static_cast<std::streamsize>(bytes->size()));
  ASSERT_TRUE(file.good()) << "writing " << out;
}

}  // namespace
}  // namespace tailorkv::profiler
