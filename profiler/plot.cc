#include "profiler/plot.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tailorkv::profiler {
namespace {

// ---------------------------------------------------------------- PNG -----

void AppendU32BigEndian(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>(v >> 24));
  out.push_back(static_cast<char>(v >> 16));
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v));
}

// length, type, data, CRC-32 over type + data (PNG spec 5.3).
void AppendChunk(std::string& out, std::string_view type, std::string_view data) {
  AppendU32BigEndian(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.append(type);
  out.append(data);
  const uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(out.data() + type_at),
                          static_cast<uInt>(type.size() + data.size()));
  AppendU32BigEndian(out, static_cast<uint32_t>(crc));
}

// ------------------------------------------------------------- Canvas -----

struct Rgb {
  uint8_t r, g, b;
};

constexpr Rgb kWhite{255, 255, 255};
constexpr Rgb kInk{30, 30, 30};
constexpr Rgb kFrame{70, 70, 70};
constexpr Rgb kGrid{225, 225, 225};
constexpr Rgb kOrange{255, 127, 14};  // sparse
constexpr Rgb kBlue{31, 119, 180};    // quantization
constexpr Rgb kGreen{44, 160, 44};    // dense
constexpr Rgb kGreyBar{150, 150, 150};
constexpr Rgb kRed{214, 39, 40};

// 5x7 glyphs for ASCII 32..126, one byte per row (top first), bit 4 = left
// column. Glyphs marked "descender" are drawn kDescent rows lower, so a line
// of text is 9 rows tall.
constexpr std::array<std::array<uint8_t, 7>, 95> kFont = {{
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // ' '
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04},  // !
    {0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00},  // "
    {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A},  // #
    {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04},  // $
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03},  // %
    {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D},  // &
    {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00},  // '
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02},  // (
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08},  // )
    {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00},  // *
    {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00},  // +
    {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08},  // ,
    {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00},  // -
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C},  // .
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00},  // /
    {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E},  // 0
    {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E},  // 1
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F},  // 2
    {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E},  // 3
    {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02},  // 4
    {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E},  // 5
    {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E},  // 6
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},  // 7
    {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E},  // 8
    {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C},  // 9
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00},  // :
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08},  // ;
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02},  // <
    {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00},  // =
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08},  // >
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04},  // ?
    {0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E},  // @
    {0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11},  // A
    {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E},  // B
    {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E},  // C
    {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C},  // D
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F},  // E
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10},  // F
    {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F},  // G
    {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // H
    {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // I
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C},  // J
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11},  // K
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F},  // L
    {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11},  // M
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11},  // N
    {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // O
    {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10},  // P
    {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D},  // Q
    {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11},  // R
    {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E},  // S
    {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // T
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // U
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04},  // V
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A},  // W
    {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11},  // X
    {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04},  // Y
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F},  // Z
    {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E},  // [
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00},  // backslash
    {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E},  // ]
    {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00},  // ^
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F},  // _
    {0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00},  // `
    {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F},  // a
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E},  // b
    {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E},  // c
    {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F},  // d
    {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E},  // e
    {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08},  // f
    {0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // g (descender)
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11},  // h
    {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E},  // i
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C},  // j
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12},  // k
    {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // l
    {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11},  // m
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11},  // n
    {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E},  // o
    {0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10},  // p (descender)
    {0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01},  // q (descender)
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10},  // r
    {0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E},  // s
    {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06},  // t
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D},  // u
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04},  // v
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A},  // w
    {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11},  // x
    {0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // y (descender)
    {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F},  // z
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02},  // {
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // |
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08},  // }
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00},  // ~
}};

constexpr int kGlyphW = 5;
constexpr int kGlyphH = 7;
constexpr int kAdvance = kGlyphW + 1;
constexpr int kDescent = 2;

int DropOf(char c) { return (c == 'g' || c == 'p' || c == 'q' || c == 'y') ? kDescent : 0; }

const std::array<uint8_t, 7>& Glyph(char c) {
  const unsigned char u = static_cast<unsigned char>(c);
  return kFont[(u >= 32 && u <= 126) ? u - 32 : '?' - 32];
}

int TextWidth(std::string_view s, int scale = 1) {
  return s.empty() ? 0 : (static_cast<int>(s.size()) * kAdvance - 1) * scale;
}

// An RGB raster; every draw call clips to the image, so labels that do not
// fit are cut at the edge rather than written out of bounds.
class Canvas {
 public:
  Canvas(int width, int height) : w_(width), h_(height), rgb_(size_t{3} * width * height, 255) {}

  int width() const { return w_; }
  int height() const { return h_; }
  std::vector<uint8_t>& rgb() { return rgb_; }

  void Set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    uint8_t* p = &rgb_[(static_cast<size_t>(y) * w_ + x) * 3];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }

  // Rows [y0, y1), columns [x0, x1).
  void Fill(int x0, int y0, int x1, int y1, Rgb c) {
    x0 = std::max(x0, 0);
    y0 = std::max(y0, 0);
    x1 = std::min(x1, w_);
    y1 = std::min(y1, h_);
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) Set(x, y, c);
  }

  void HLine(int x0, int x1, int y, Rgb c) { Fill(x0, y, x1, y + 1, c); }
  void VLine(int x, int y0, int y1, Rgb c) { Fill(x, y0, x + 1, y1, c); }

  // Top-left corner at (x, y).
  void Text(int x, int y, std::string_view s, Rgb c, int scale = 1) {
    for (char ch : s) {
      const auto& g = Glyph(ch);
      const int top = y + DropOf(ch) * scale;
      for (int gy = 0; gy < kGlyphH; ++gy)
        for (int gx = 0; gx < kGlyphW; ++gx)
          if (g[gy] & (0x10 >> gx)) Fill(x + gx * scale, top + gy * scale, x + (gx + 1) * scale,
                                         top + (gy + 1) * scale, c);
      x += kAdvance * scale;
    }
  }

  // Rotated 90 degrees counter-clockwise, read bottom to top; (x, y_bottom)
  // is the bottom-left corner of the first glyph.
  void TextUp(int x, int y_bottom, std::string_view s, Rgb c) {
    for (char ch : s) {
      const auto& g = Glyph(ch);
      for (int gy = 0; gy < kGlyphH; ++gy)
        for (int gx = 0; gx < kGlyphW; ++gx)
          if (g[gy] & (0x10 >> gx)) Set(x + DropOf(ch) + gy, y_bottom - gx, c);
      y_bottom -= kAdvance;
    }
  }

 private:
  int w_, h_;
  std::vector<uint8_t> rgb_;
};

// ----------------------------------------------------------- Plotting -----

absl::Status ValidatePoints(const std::vector<LayerErrorPoint>& points) {
  if (points.empty()) return absl::InvalidArgumentError("points: must not be empty");
  for (size_t i = 0; i < points.size(); ++i) {
    const LayerErrorPoint& p = points[i];
    const std::string at = absl::StrCat("points[", i, "].");
    if (p.layer != static_cast<int>(i)) {
      return absl::InvalidArgumentError(absl::StrCat(
          at, "layer: must be ", i, " (layers 0..n-1 in order), got ", p.layer));
    }
    if (p.policy != 'q' && p.policy != 's' && p.policy != 'd') {
      const unsigned char u = static_cast<unsigned char>(p.policy);
      return absl::InvalidArgumentError(absl::StrCat(
          at, "policy: must be 'q', 's' or 'd', got ",
          (u >= 32 && u <= 126) ? absl::StrCat("'", std::string(1, p.policy), "'")
                                : absl::StrFormat("byte 0x%02x", u)));
    }
    if (!(std::isfinite(p.dense_preference) && p.dense_preference >= 0.0 &&
          p.dense_preference <= 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, "dense_preference: must be in [0, 1], got ", p.dense_preference));
    }
    if (!(std::isfinite(p.sparse_error) && p.sparse_error >= 0.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, "sparse_error: must be finite and >= 0, got ", p.sparse_error));
    }
    if (!(std::isfinite(p.quant_error) && p.quant_error >= 0.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, "quant_error: must be finite and >= 0, got ", p.quant_error));
    }
  }
  return absl::OkStatus();
}

// Vertical layout, in rows from the top. The fixed strips hold the title,
// the legend, the policy letters + layer numbers and the bottom panel's
// label; what is left goes 70/30 to the two panels.
constexpr int kMarginLeft = 56;
constexpr int kMarginRight = kPlotMarginX - kMarginLeft;
constexpr int kTitleY = 6;
constexpr int kLegendY = 28;
constexpr int kTopPanelY = 46;
constexpr int kBetweenPanels = 44;
constexpr int kBottomMargin = 8;

Rgb PolicyColour(char policy) {
  switch (policy) {
    case 'q': return kBlue;
    case 's': return kOrange;
    default: return kGreen;
  }
}

char PolicyLetter(char policy) {
  switch (policy) {
    case 'q': return 'Q';
    case 's': return 'S';
    default: return 'D';
  }
}

// Row of value fraction f in [0, 1] for a panel whose axis row is `bottom`
// and which is `h` rows tall: 0 -> bottom, 1 -> bottom - h (the top row).
int RowOf(double f, int bottom, int h) {
  return bottom - static_cast<int>(std::lround(std::clamp(f, 0.0, 1.0) * h));
}

std::string DecadeLabel(int d) { return absl::StrCat("1e", d); }

void DrawLegend(Canvas& c, int x, int y, int x_limit) {
  // Each item is drawn only when it fits whole, so a narrow plot drops the
  // tail of the legend instead of cutting a word.
  auto fits = [&](int w) { return x + w <= x_limit; };
  auto swatch_item = [&](Rgb colour, std::string_view label) {
    const int w = 10 + 4 + TextWidth(label);
    if (!fits(w)) return false;
    c.Fill(x, y, x + 10, y + kGlyphH, colour);
    c.Text(x + 14, y, label, kInk);
    x += w + 14;
    return true;
  };
  if (!swatch_item(kOrange, "sparse error")) return;
  if (!swatch_item(kBlue, "quantization error")) return;
  const std::string_view plan = "plan:";
  if (!fits(TextWidth(plan))) return;
  c.Text(x, y, plan, kInk);
  x += TextWidth(plan) + kAdvance;
  for (char policy : {'q', 's', 'd'}) {
    const std::string_view name = policy == 'q' ? "quant" : policy == 's' ? "sparse" : "dense";
    const int w = 2 * kAdvance + TextWidth(name);
    if (!fits(w)) return;
    c.Text(x, y, std::string(1, PolicyLetter(policy)), PolicyColour(policy));
    c.Text(x + 2 * kAdvance, y, name, kInk);
    x += w + 2 * kAdvance;
  }
}

}  // namespace

absl::StatusOr<std::string> EncodePngRgb(int width, int height, const std::vector<uint8_t>& rgb) {
  if (width < 1 || width > kMaxPlotSide) {
    return absl::InvalidArgumentError(
        absl::StrCat("width: must be in [1, ", kMaxPlotSide, "], got ", width));
  }
  if (height < 1 || height > kMaxPlotSide) {
    return absl::InvalidArgumentError(
        absl::StrCat("height: must be in [1, ", kMaxPlotSide, "], got ", height));
  }
  const size_t row_bytes = size_t{3} * static_cast<size_t>(width);
  if (rgb.size() != row_bytes * static_cast<size_t>(height)) {
    return absl::InvalidArgumentError(absl::StrCat("rgb.size(): must be width*height*3 = ",
                                                   row_bytes * height, ", got ", rgb.size()));
  }
  std::string raw;
  raw.reserve((row_bytes + 1) * height);
  for (int y = 0; y < height; ++y) {
    raw.push_back('\0');  // filter type 0 (None)
    raw.append(reinterpret_cast<const char*>(rgb.data() + row_bytes * y), row_bytes);
  }
  uLongf packed_size = compressBound(static_cast<uLong>(raw.size()));
  std::string packed(packed_size, '\0');
  const int rc = compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size,
                           reinterpret_cast<const Bytef*>(raw.data()),
                           static_cast<uLong>(raw.size()), Z_BEST_COMPRESSION);
  if (rc != Z_OK) return absl::InternalError(absl::StrCat("zlib compress2 failed: ", rc));
  packed.resize(packed_size);

  std::string ihdr;
  AppendU32BigEndian(ihdr, static_cast<uint32_t>(width));
  AppendU32BigEndian(ihdr, static_cast<uint32_t>(height));
  ihdr.push_back(8);  // bit depth
  ihdr.push_back(2);  // colour type: truecolour (RGB)
  ihdr.push_back(0);  // compression: deflate
  ihdr.push_back(0);  // filter method 0
  ihdr.push_back(0);  // no interlace

  std::string png("\x89PNG\r\n\x1a\n", 8);
  AppendChunk(png, "IHDR", ihdr);
  AppendChunk(png, "IDAT", packed);
  AppendChunk(png, "IEND", "");
  return png;
}

absl::StatusOr<std::string> RenderLayerErrorPlot(const std::vector<LayerErrorPoint>& points,
                                                 const PlotOptions& options) {
  if (absl::Status s = ValidatePoints(points); !s.ok()) return s;
  if (!(std::isfinite(options.threshold) && options.threshold >= 0.0 &&
        options.threshold <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("options.threshold: must be in [0, 1], got ", options.threshold));
  }
  const int n = static_cast<int>(points.size());
  const int64_t min_width = std::max<int64_t>(
      kMinPlotWidth, kPlotMarginX + int64_t{kMinPixelsPerLayer} * points.size());
  int width = options.width;
  if (width == 0) {
    width = static_cast<int>(
        std::min<int64_t>(kMaxPlotSide, std::max<int64_t>(640, 64 + int64_t{24} * n)));
    if (width < min_width) {
      return absl::InvalidArgumentError(absl::StrCat("points: ", n, " layers do not fit in the ",
                                                     kMaxPlotSide, " px widest plot"));
    }
  } else if (width < min_width || width > kMaxPlotSide) {
    return absl::InvalidArgumentError(absl::StrCat("options.width: must be 0 (auto) or in [",
                                                   min_width, ", ", kMaxPlotSide, "] for ", n,
                                                   " layers, got ", width));
  }
  const int height = options.height == 0 ? 480 : options.height;
  if (height < kMinPlotHeight || height > kMaxPlotSide) {
    return absl::InvalidArgumentError(absl::StrCat("options.height: must be 0 (auto) or in [",
                                                   kMinPlotHeight, ", ", kMaxPlotSide,
                                                   "], got ", options.height));
  }

  Canvas c(width, height);
  const int x0 = kMarginLeft;
  const int x1 = width - kMarginRight;  // exclusive
  const int plot_w = x1 - x0;
  const int panels_h = height - kTopPanelY - kBetweenPanels - kBottomMargin;
  const int top_h = panels_h * 7 / 10;
  const int top_bottom = kTopPanelY + top_h;  // axis row of the top panel
  const int bot_top = top_bottom + kBetweenPanels;
  const int bot_h = panels_h - top_h;
  const int bot_bottom = bot_top + bot_h;

  // Layer i owns columns [SlotX(i), SlotX(i + 1)); slots differ by <= 1 px.
  auto slot_x = [&](int i) { return x0 + static_cast<int>(int64_t{i} * plot_w / n); };
  auto slot_center = [&](int i) { return (slot_x(i) + slot_x(i + 1)) / 2; };
  const int slot_min = plot_w / n;
  // Capped so a plot of few layers shows bars, not walls.
  const int bar_w = std::clamp(slot_min * 3 / 8, 1, 24);

  // Log axis in whole decades, strictly below the smallest nonzero error so
  // that even it gets a visible bar; zeros sit at the bottom (no bar).
  double min_nz = 0.0, max_v = 0.0;
  for (const LayerErrorPoint& p : points) {
    for (double v : {p.sparse_error, p.quant_error}) {
      if (v > 0.0) {
        min_nz = (min_nz == 0.0) ? v : std::min(min_nz, v);
        max_v = std::max(max_v, v);
      }
    }
  }
  int lo = -3, hi = 0;
  if (max_v > 0.0) {
    lo = static_cast<int>(std::ceil(std::log10(min_nz))) - 1;
    hi = std::max(static_cast<int>(std::ceil(std::log10(max_v))), lo + 1);
  }
  const int decades = hi - lo;
  auto error_row = [&](double v) {
    if (v <= 0.0) return top_bottom;
    return RowOf((std::log10(v) - lo) / decades, top_bottom, top_h);
  };

  // Title, legend.
  c.Text(x0, kTitleY, options.title, kInk, 2);
  DrawLegend(c, x0, kLegendY, width - 4);

  // Top panel: gridlines and decade labels (thinned so labels keep >= 11 rows
  // apart), then bars, then the frame on top.
  const int label_stride = std::max(1, static_cast<int>(std::ceil(11.0 * decades / top_h)));
  const bool grid_every_decade = top_h >= 4 * decades;
  for (int d = lo; d <= hi; ++d) {
    const bool labelled = (d - lo) % label_stride == 0;
    const int y = RowOf(static_cast<double>(d - lo) / decades, top_bottom, top_h);
    if (d != lo && d != hi && (labelled || grid_every_decade)) c.HLine(x0, x1, y, kGrid);
    if (!labelled) continue;
    c.HLine(x0 - 4, x0, y, kFrame);
    const std::string label = DecadeLabel(d);
    c.Text(x0 - 6 - TextWidth(label), y - kGlyphH / 2, label, kInk);
  }
  for (int i = 0; i < n; ++i) {
    const int cx = slot_center(i);
    c.Fill(cx - bar_w, error_row(points[i].sparse_error), cx, top_bottom, kOrange);
    c.Fill(cx, error_row(points[i].quant_error), cx + bar_w, top_bottom, kBlue);
  }
  c.HLine(x0 - 1, x1 + 1, kTopPanelY - 1, kFrame);
  c.HLine(x0 - 1, x1 + 1, top_bottom, kFrame);
  c.VLine(x0 - 1, kTopPanelY - 1, top_bottom + 1, kFrame);
  c.VLine(x1, kTopPanelY - 1, top_bottom + 1, kFrame);
  const std::string_view y_name = "rel. L2 error of attention output";
  if (TextWidth(y_name) <= top_h) {  // else it would run into the legend and letters
    c.TextUp(4, kTopPanelY + top_h / 2 + TextWidth(y_name) / 2, y_name, kInk);
  }

  // Policy letters and layer numbers under the top panel.
  int number_stride = n <= 40 ? 1 : 4;
  const int widest_number = TextWidth(absl::StrCat(n - 1)) + 3;
  while (number_stride * slot_min < widest_number) number_stride *= 2;
  for (int i = 0; i < n; ++i) {
    const int cx = slot_center(i);
    c.Text(cx - kGlyphW / 2, top_bottom + 4, std::string(1, PolicyLetter(points[i].policy)),
           PolicyColour(points[i].policy));
    if (i % number_stride == 0) {
      const std::string num = absl::StrCat(i);
      c.Text(cx - TextWidth(num) / 2, top_bottom + 14, num, kInk);
    }
  }

  // Bottom panel: dense preference on 0..1 with the threshold line.
  const std::string_view bot_name = "dense preference (> threshold: quantize)";
  c.Text(x0, bot_top - 13, bot_name, kInk);
  const std::string threshold_label = absl::StrFormat("threshold = %.2f", options.threshold);
  const int threshold_x = x0 + TextWidth(bot_name) + 3 * kAdvance;
  if (threshold_x + TextWidth(threshold_label) <= width) {
    c.Text(threshold_x, bot_top - 13, threshold_label, kRed);
  }
  c.HLine(x0, x1, RowOf(0.5, bot_bottom, bot_h), kGrid);
  for (int i = 0; i < n; ++i) {
    const int cx = slot_center(i);
    c.Fill(cx - bar_w, RowOf(points[i].dense_preference, bot_bottom, bot_h), cx + bar_w,
           bot_bottom, kGreyBar);
  }
  c.HLine(x0 - 1, x1 + 1, bot_top - 1, kFrame);
  c.HLine(x0 - 1, x1 + 1, bot_bottom, kFrame);
  c.VLine(x0 - 1, bot_top - 1, bot_bottom + 1, kFrame);
  c.VLine(x1, bot_top - 1, bot_bottom + 1, kFrame);
  for (double f : {0.0, 0.5, 1.0}) {
    const int y = RowOf(f, bot_bottom, bot_h);
    const std::string label = f == 0.0 ? "0" : f == 0.5 ? "0.5" : "1";
    c.HLine(x0 - 4, x0, y, kFrame);
    c.Text(x0 - 6 - TextWidth(label), y - kGlyphH / 2, label, kInk);
  }
  // Dashed, two rows thick (the threshold's row and the one above), over the
  // bars so it stays visible where they cross it.
  const int ty = RowOf(options.threshold, bot_bottom, bot_h);
  for (int x = x0; x < x1; x += 10) {
    c.Fill(x, ty - 1, std::min(x + 6, x1), ty + 1, kRed);
  }

  return EncodePngRgb(c.width(), c.height(), c.rgb());
}

}  // namespace tailorkv::profiler
