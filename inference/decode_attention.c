/* A decode step's attention, one query position per row, each row over its own positions only
   (inference/decode_attention.py builds this file and calls it).

   Every (row, head) is computed by the same code whatever the other rows hold or how many there are, so a
   row's result is the same, bit for bit, alone or in any batch. Compiled with -ffast-math for the
   vectorised exp and reductions: the order they add in is fixed by the code and the row's length, not by
   the batch. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* query, out: (rows, heads, dim), contiguous. Row r's keys for head h: its positions first[r] to total - 1,
   position p at key + r * key_row + h * key_head + p * dim (values likewise). */
int decode_attention(const float *query, const float *key, const float *value, float *out, const int64_t *first,
                     int64_t total, int64_t rows, int64_t heads, int64_t dim, int64_t key_row, int64_t key_head,
                     int64_t value_row, int64_t value_head, float scale, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *weights = malloc(sizeof(float) * (size_t)total); /* a row's scores, then its softmax */
        float *sum_v = malloc(sizeof(float) * (size_t)dim);
        if (weights == NULL || sum_v == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * heads; ++item) {
            if (weights == NULL || sum_v == NULL) continue;
            const int64_t row = item / heads, head = item % heads, length = total - first[row];
            const float *q = query + item * dim;
            const float *k = key + row * key_row + head * key_head + first[row] * dim;
            const float *v = value + row * value_row + head * value_head + first[row] * dim;
            float largest = -FLT_MAX;
            for (int64_t p = 0; p < length; ++p) {
                float dot = 0.0f;
                for (int64_t d = 0; d < dim; ++d) dot += q[d] * k[p * dim + d];
                weights[p] = dot * scale;
                largest = weights[p] > largest ? weights[p] : largest;
            }
            float total_weight = 0.0f;
            for (int64_t p = 0; p < length; ++p) {
                weights[p] = expf(weights[p] - largest);
                total_weight += weights[p];
            }
            for (int64_t d = 0; d < dim; ++d) sum_v[d] = 0.0f;
            for (int64_t p = 0; p < length; ++p)
                for (int64_t d = 0; d < dim; ++d) sum_v[d] += weights[p] * v[p * dim + d];
            for (int64_t d = 0; d < dim; ++d) out[item * dim + d] = sum_v[d] / total_weight;
        }
        free(weights);
        free(sum_v);
    }
    return failed;
}
