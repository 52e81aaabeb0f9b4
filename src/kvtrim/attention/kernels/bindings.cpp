// The Python module of kvtrim's CPU kernels (built by kvtrim/attention/cpu_kernels.py).

#include <torch/extension.h>

torch::Tensor ragged_attention(torch::Tensor query, torch::Tensor kept_keys, torch::Tensor kept_values,
                               torch::Tensor offsets, torch::Tensor added_keys,
                               torch::Tensor added_values, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ragged_attention", &ragged_attention, "Ragged-layer attention on CPU, all heads in one call");
}
