/* The eager CPU augmentation of fixmatch_accel/augment/tensor.py as loops over the batch: one
 * RandAugment layer with each sample's own op (fixmatch_apply_layer), weak_batch's flip + crop
 * (fixmatch_crop_flip) and normalize_batch (fixmatch_normalize). Built and loaded by native.py.
 *
 * One call per batch instead of eager PyTorch's many small kernel calls and temporaries per op.
 * Every expression keeps the tensor path's types and order of operations (float32 where it
 * blends, double where PIL's coordinates are double), and the build turns off FMA contraction,
 * so the pixels are the same bit for bit (tests/test_native.py).
 * Random draws, arguments (timm's level-to-arg) and affine matrices come from the tensor path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Op codes: native.py numbers the cases named in fixmatch_accel/augment/ops.py's table and
 * passes them as -DOP_<NAME>=<code> (and OP_KEEP, a sample left unchanged), so no number is
 * written here. */
#ifndef OP_KEEP
#error "build through fixmatch_accel/augment/native.py, which defines the op codes"
#endif

/* floor of a coordinate: libm's floor is a call on baseline x86-64, this a convert and a
 * compare; the same result for any |v| < 2 ** 31 (native.py bounds the image sides) */
static inline double floor_d(double v) {
    double t = (double)(int32_t)v;
    return t > v ? t - 1.0 : t;
}

static inline uint8_t clip_trunc(float v) {  /* clamp to 0..255, then truncate */
    if (v < 0.0f) v = 0.0f;
    if (v > 255.0f) v = 255.0f;
    return (uint8_t)(int32_t)v;
}

static inline uint8_t blend(float deg, float f, float v) {  /* PIL Image.blend in C float */
    return clip_trunc(deg + f * (v - deg));
}

static void apply_lut(const uint8_t *src, uint8_t *dst, int64_t hw, const uint8_t *lut) {
    for (int64_t p = 0; p < hw; p++) dst[p] = lut[src[p]];
}

static void autocontrast(const uint8_t *src, uint8_t *dst, int64_t hw) {
    uint8_t lut[256];
    int lo = 255, hi = 0;
    for (int64_t p = 0; p < hw; p++) {
        if (src[p] < lo) lo = src[p];
        if (src[p] > hi) hi = src[p];
    }
    for (int i = 0; i < 256; i++) lut[i] = (uint8_t)i;
    if (hi > lo) {
        double scale = 255.0 / (double)(hi - lo);
        double offset = -(double)lo * scale;
        for (int i = 0; i < 256; i++) {
            int64_t v = (int64_t)((double)i * scale + offset);
            lut[i] = (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
        }
    }
    apply_lut(src, dst, hw, lut);
}

static void equalize(const uint8_t *src, uint8_t *dst, int64_t hw) {
    int64_t hist[256] = {0};
    uint8_t lut[256];
    int top = 0, present = 0;
    for (int64_t p = 0; p < hw; p++) hist[src[p]]++;
    for (int i = 0; i < 256; i++) {
        if (hist[i]) { top = i; present++; }
    }
    int64_t step = (hw - hist[top]) / 255;
    int64_t before = 0;
    for (int i = 0; i < 256; i++) {
        if (present <= 1 || step == 0) {
            lut[i] = (uint8_t)i;
        } else {
            int64_t v = (step / 2 + before) / step;
            lut[i] = (uint8_t)(v > 255 ? 255 : v);
        }
        before += hist[i];
    }
    apply_lut(src, dst, hw, lut);
}

/* PIL's RGB -> L: (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16; the image itself for C=1 */
static inline int32_t gray_at(const uint8_t *img, int64_t c, int64_t hw, int64_t p) {
    if (c == 1) return img[p];
    return ((int32_t)img[p] * 19595 + (int32_t)img[hw + p] * 38470 +
            (int32_t)img[2 * hw + p] * 7471 + 0x8000) >> 16;
}

/* blend with the grayscale image; gray: h * w floats of scratch */
static void color(const uint8_t *src, uint8_t *dst, int64_t c, int64_t hw, float f, float *gray) {
    for (int64_t p = 0; p < hw; p++) gray[p] = (float)gray_at(src, c, hw, p);
    for (int64_t ch = 0; ch < c; ch++) {
        const uint8_t *s = src + ch * hw;
        uint8_t *d = dst + ch * hw;
        for (int64_t p = 0; p < hw; p++) d[p] = blend(gray[p], f, (float)s[p]);
    }
}

/* blend with the rounded mean of the grayscale image */
static void contrast(const uint8_t *src, uint8_t *dst, int64_t c, int64_t hw, float f) {
    int64_t total = 0;
    for (int64_t p = 0; p < hw; p++) total += gray_at(src, c, hw, p);
    int64_t mean = (2 * total + hw) / (2 * hw);
    for (int64_t p = 0; p < c * hw; p++) dst[p] = blend((float)mean, f, (float)src[p]);
}

/* ImageFilter.SMOOTH as _smooth computes it (float32, same sums in the same order), blended;
 * p: h * w floats of scratch */
static void sharpness(const uint8_t *src, uint8_t *dst, int64_t h, int64_t w, float f, float *p) {
    const float k = (float)(1.0 / 13), k5 = (float)(5.0 / 13);
    for (int64_t q = 0; q < h * w; q++) dst[q] = blend((float)src[q], f, (float)src[q]);
    if (h < 3 || w < 3) return;  /* the smoothed image is the image */
    for (int64_t q = 0; q < h * w; q++) p[q] = (float)src[q] * k;
    for (int64_t y = 1; y < h - 1; y++) {
        const float *up = p + (y - 1) * w, *mid = p + y * w, *down = p + (y + 1) * w;
        const uint8_t *row = src + y * w;
        uint8_t *out = dst + y * w;
        for (int64_t x = 1; x < w - 1; x++) {
            float v = (float)row[x];
            float below = (down[x - 1] + down[x]) + down[x + 1];
            float above = (up[x - 1] + up[x]) + up[x + 1];
            float middle = (mid[x - 1] + v * k5) + mid[x + 1];
            float ss = ((0.5f + below) + middle) + above;
            if (ss < 0.0f) ss = 0.0f;
            if (ss > 255.0f) ss = 255.0f;
            out[x] = blend((float)(int32_t)ss, f, v);  /* floor: ss >= 0 */
        }
    }
}

static inline int64_t clampi(int64_t v, int64_t lo, int64_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline int64_t floor_div16(int64_t v) {  /* floor(v / 65536) for negative v too */
    return v >= 0 ? v / 65536 : -((-v + 65535) / 65536);
}

static inline int64_t fix16(double v) {  /* PIL's FIX: floor(v * 65536 + 0.5), as _fix16 */
    double whole = floor(v);  /* not floor_d: any double may come here */
    return (int64_t)whole * 65536 + (int64_t)floor((v - whole) * 65536.0 + 0.5);
}

/* PIL's nearest affine, in 16.16 fixed point (Geometry.c affine_fixed), as _affine_sample */
static void affine_nearest(const uint8_t *src, uint8_t *dst, int64_t c, int64_t h, int64_t w,
                           const double *m, const uint8_t *fill) {
    int64_t hw = h * w;
    int64_t fa = fix16(m[0]), fb = fix16(m[1]), fc = fix16(m[2] + m[0] * 0.5 + m[1] * 0.5);
    int64_t fd = fix16(m[3]), fe = fix16(m[4]), ff = fix16(m[5] + m[3] * 0.5 + m[4] * 0.5);
    for (int64_t y = 0; y < h; y++) {
        for (int64_t x = 0; x < w; x++) {
            int64_t col = floor_div16(fc + x * fa + y * fb);
            int64_t row = floor_div16(ff + x * fd + y * fe);
            int64_t q = y * w + x;
            int inside = col >= 0 && col < w && row >= 0 && row < h;
            for (int64_t ch = 0; ch < c; ch++)
                dst[ch * hw + q] = inside ? src[ch * hw + row * w + col] : fill[ch];
        }
    }
}

/* One output row of PIL's bilinear affine: for each column the flat indices of the (up to) four
 * taps, the weights along x and y and whether the point is inside (w entries each). */
typedef struct {
    double *dx, *dy;
    int32_t *i00, *i01, *i10, *i11, *inside;
} Taps;

/* PIL's bilinear affine in double, as _affine_sample: the point of output pixel centre
 * (x + .5, y + .5), an inside test, floor and weight of (s - .5), taps clamped at the edges;
 * one-axis ops compute only the coordinate that moves and read two taps (the other weight is 0) */
static void affine_bilinear(const uint8_t *src, uint8_t *dst, int64_t c, int64_t h, int64_t w,
                            const double *m, const uint8_t *fill, int op, Taps *t) {
    int64_t hw = h * w;
    int moves_x = op == OP_AFFINE_XY || op == OP_AFFINE_X || op == OP_AFFINE_TX;
    int moves_y = op == OP_AFFINE_XY || op == OP_AFFINE_Y || op == OP_AFFINE_TY;
    for (int64_t y = 0; y < h; y++) {
        double gy = (double)y + 0.5;
        for (int64_t x = 0; x < w; x++) {
            double gx = (double)x + 0.5, sx = gx, sy = gy;
            if (op == OP_AFFINE_XY) {
                sx = m[0] * gx + m[1] * gy + m[2];
                sy = m[3] * gx + m[4] * gy + m[5];
            } else if (op == OP_AFFINE_X) {
                sx = gx + m[1] * gy;
            } else if (op == OP_AFFINE_TX) {
                sx = gx + m[2];
            } else if (op == OP_AFFINE_Y) {
                sy = m[3] * gx + gy;
            } else {
                sy = gy + m[5];
            }
            int inside = 1;
            int64_t x0 = x, y0 = y;
            double dx = 0.0, dy = 0.0;
            if (moves_x) {
                inside = sx >= 0.0 && sx < (double)w;
                double s = sx - 0.5, s0 = floor_d(s);
                x0 = (int32_t)s0;
                dx = s - s0;
            }
            if (moves_y) {
                inside = inside && sy >= 0.0 && sy < (double)h;
                double s = sy - 0.5, s0 = floor_d(s);
                y0 = (int32_t)s0;
                dy = s - s0;
            }
            int64_t r0 = clampi(y0, 0, h - 1) * w, r1 = clampi(y0 + 1, 0, h - 1) * w;
            int64_t c0 = clampi(x0, 0, w - 1), c1 = clampi(x0 + 1, 0, w - 1);
            t->i00[x] = (int32_t)(r0 + c0);
            t->i01[x] = (int32_t)(r0 + c1);
            t->i10[x] = (int32_t)(r1 + c0);
            t->i11[x] = (int32_t)(r1 + c1);
            t->dx[x] = dx;
            t->dy[x] = dy;
            t->inside[x] = inside;
        }
        for (int64_t ch = 0; ch < c; ch++) {
            const uint8_t *s = src + ch * hw;
            uint8_t *out = dst + ch * hw + y * w;
            if (!moves_y) {
                for (int64_t x = 0; x < w; x++) {
                    int v00 = s[t->i00[x]];
                    double v = (double)(s[t->i01[x]] - v00) * t->dx[x] + (double)v00;
                    out[x] = t->inside[x] ? (uint8_t)(int32_t)v : fill[ch];
                }
            } else if (!moves_x) {
                for (int64_t x = 0; x < w; x++) {
                    int v00 = s[t->i00[x]];
                    double v = (double)(s[t->i10[x]] - v00) * t->dy[x] + (double)v00;
                    out[x] = t->inside[x] ? (uint8_t)(int32_t)v : fill[ch];
                }
            } else {
                for (int64_t x = 0; x < w; x++) {
                    int v00 = s[t->i00[x]], v10 = s[t->i10[x]];
                    double top = (double)(s[t->i01[x]] - v00) * t->dx[x] + (double)v00;
                    double bottom = (double)(s[t->i11[x]] - v10) * t->dx[x] + (double)v10;
                    double v = (bottom - top) * t->dy[x] + top;
                    out[x] = t->inside[x] ? (uint8_t)(int32_t)v : fill[ch];
                }
            }
        }
    }
}

/* x, out: contiguous uint8 [n, c, h, w]; sample index[j] gets op[j], one of the OP_ codes
 * (OP_KEEP: unchanged), with argument arg[j] and PIL's AFFINE data affine[6 j .. 6 j + 5]
 * (output -> input); fill[c]; nearest: PIL's nearest resampling instead of bilinear;
 * scratch: 8-byte aligned, max(4 h w, 36 w) bytes (fixmatch_scratch_bytes). */
int64_t fixmatch_scratch_bytes(int64_t h, int64_t w) {
    return 4 * h * w > 36 * w ? 4 * h * w : 36 * w;
}

void fixmatch_apply_layer(const uint8_t *x, uint8_t *out, int64_t n, int64_t c, int64_t h,
                          int64_t w, const int64_t *index, const int32_t *op, const double *arg,
                          const double *affine, const uint8_t *fill, int32_t nearest,
                          void *scratch_bytes) {
    int64_t hw = h * w, size = c * hw;
    float *scratch = (float *)scratch_bytes;
    Taps taps;
    taps.dx = (double *)scratch_bytes;
    taps.dy = taps.dx + w;
    taps.i00 = (int32_t *)(taps.dy + w);
    taps.i01 = taps.i00 + w;
    taps.i10 = taps.i01 + w;
    taps.i11 = taps.i10 + w;
    taps.inside = taps.i11 + w;
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *src = x + index[j] * size;
        uint8_t *dst = out + index[j] * size;
        double a = arg[j];
        switch (op[j]) {
        case OP_INVERT:
            for (int64_t p = 0; p < size; p++) dst[p] = (uint8_t)(255 - src[p]);
            break;
        case OP_POSTERIZE: {  /* keep the multiples of 2 ** (8 - bits), bits clipped to 0..8 */
            double e = 8 - a;
            e = e < 0 ? 0 : (e > 8 ? 8 : e);
            uint8_t mask = (uint8_t)(256 - (int64_t)pow(2.0, e));
            for (int64_t p = 0; p < size; p++) dst[p] = src[p] & mask;
            break;
        }
        case OP_SOLARIZE: {
            int16_t threshold = (int16_t)a;
            for (int64_t p = 0; p < size; p++)
                dst[p] = src[p] < threshold ? src[p] : (uint8_t)(255 - src[p]);
            break;
        }
        case OP_SOLARIZE_ADD: {
            int16_t add = (int16_t)a;
            for (int64_t p = 0; p < size; p++) {
                int16_t v = (int16_t)(src[p] + add);
                dst[p] = src[p] < 128 ? (uint8_t)(v > 255 ? 255 : v) : src[p];
            }
            break;
        }
        case OP_AUTOCONTRAST:
            for (int64_t ch = 0; ch < c; ch++) autocontrast(src + ch * hw, dst + ch * hw, hw);
            break;
        case OP_EQUALIZE:
            for (int64_t ch = 0; ch < c; ch++) equalize(src + ch * hw, dst + ch * hw, hw);
            break;
        case OP_COLOR:
            color(src, dst, c, hw, (float)a, scratch);
            break;
        case OP_CONTRAST:
            contrast(src, dst, c, hw, (float)a);
            break;
        case OP_BRIGHTNESS:
            for (int64_t p = 0; p < size; p++) dst[p] = blend(0.0f, (float)a, (float)src[p]);
            break;
        case OP_SHARPNESS:
            for (int64_t ch = 0; ch < c; ch++)
                sharpness(src + ch * hw, dst + ch * hw, h, w, (float)a, scratch);
            break;
        case OP_AFFINE_XY: case OP_AFFINE_X: case OP_AFFINE_TX: case OP_AFFINE_Y: case OP_AFFINE_TY:
            if (nearest)
                affine_nearest(src, dst, c, h, w, affine + 6 * j, fill);
            else
                affine_bilinear(src, dst, c, h, w, affine + 6 * j, fill, op[j], &taps);
            break;
        case OP_KEEP: case OP_IDENTITY: default:
            memcpy(dst, src, (size_t)size);
        }
    }
}

/* weak_batch's pixels: sample i is read from rows reflect(y + oy[i] - pad) and columns
 * reflect(x + ox[i] - pad), mirrored when flip[i] (offsets and flips drawn by the tensor path) */
static inline int64_t reflect(int64_t v, int64_t size) {
    v = v < 0 ? -v : v;
    return v >= size ? 2 * (size - 1) - v : v;
}

void fixmatch_crop_flip(const uint8_t *x, uint8_t *out, int64_t n, int64_t c, int64_t h,
                        int64_t w, const int64_t *oy, const int64_t *ox, const uint8_t *flip,
                        int64_t pad, int64_t *cols) {
    int64_t hw = h * w;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t x0 = 0; x0 < w; x0++) {
            int64_t col = reflect(x0 + ox[i] - pad, w);
            cols[x0] = flip[i] ? w - 1 - col : col;
        }
        for (int64_t ch = 0; ch < c; ch++) {
            const uint8_t *src = x + (i * c + ch) * hw;
            uint8_t *dst = out + (i * c + ch) * hw;
            for (int64_t y = 0; y < h; y++) {
                const uint8_t *row = src + reflect(y + oy[i] - pad, h) * w;
                for (int64_t x0 = 0; x0 < w; x0++) dst[y * w + x0] = row[cols[x0]];
            }
        }
    }
}

/* normalize_batch's arithmetic in one pass: float(v) * scale[ch] + offset[ch], each rounded to
 * float32 as the tensor path's two in-place ops round it */
void fixmatch_normalize(const uint8_t *x, float *out, int64_t n, int64_t c, int64_t hw,
                        const float *scale, const float *offset) {
    for (int64_t i = 0; i < n * c; i++) {
        float s = scale[i % c], o = offset[i % c];
        const uint8_t *src = x + i * hw;
        float *dst = out + i * hw;
        for (int64_t p = 0; p < hw; p++) dst[p] = (float)src[p] * s + o;
    }
}
