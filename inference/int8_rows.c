/* The per-row scaling around the served int8 product (inference/int8_linear.py's Int8Linear calls these through
   ctypes): what its torch ops compute, in one pass over the input and one over the output instead of one pass per
   operation. Every row, and every element of the output, is computed on its own, in a fixed order, so a row's
   numbers are the same whatever else is in the batch. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* staged (rows, stride), stride > width + 1: each row of x (rows, width) with its outlier columns zeroed, divided by
   its largest magnitude, then +1, -1 and zeros (the span columns). scale (rows): those magnitudes. */
void int8_stage(const float *x, int64_t rows, int64_t width, const int64_t *columns, int64_t outliers,
                float *staged, int64_t stride, float *scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = staged + r * stride;
        memcpy(row, x + r * width, sizeof(float) * (size_t)width);
        for (int64_t c = 0; c < outliers; ++c) row[columns[c]] = 0.0f;
        float largest = 0.0f;
        for (int64_t k = 0; k < width; ++k) largest = fmaxf(largest, fabsf(row[k]));
        largest = fmaxf(largest, FLT_MIN);
        for (int64_t k = 0; k < width; ++k) row[k] = row[k] / largest;
        scale[r] = largest;
        row[width] = 1.0f;
        row[width + 1] = -1.0f;
        for (int64_t k = width + 2; k < stride; ++k) row[k] = 0.0f;
    }
}

/* out (rows, size), the kernel's product with its bias added, in place: the product scaled back by each row's
   scale and the bias added again, then each outlier column's fp32 product (x's column times its row of
   outlier_weight (outliers, size)) added one column after another. bias may be NULL. */
void int8_finish(float *out, int64_t rows, int64_t size, const float *bias, const float *scale, const float *x,
                 int64_t width, const int64_t *columns, int64_t outliers, const float *outlier_weight, int threads) {
    const int64_t block = 1024, blocks = (size + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < rows * blocks; ++item) {
        const int64_t r = item / blocks, first = item % blocks * block;
        const int64_t last = first + block < size ? first + block : size;
        float *o = out + r * size;
        const float s = scale[r];
        if (bias != NULL)
            for (int64_t n = first; n < last; ++n) o[n] = bias[n] + (o[n] - bias[n]) * s;
        else
            for (int64_t n = first; n < last; ++n) o[n] = o[n] * s;
        for (int64_t c = 0; c < outliers; ++c) {
            const float v = x[r * width + columns[c]];
            const float *w = outlier_weight + c * size;
            for (int64_t n = first; n < last; ++n) o[n] = o[n] + v * w[n];
        }
    }
}
