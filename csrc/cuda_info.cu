// What the CUDA part of the extension was built with, and whether its kernels can run on a GPU.
#include <cuda_runtime_api.h>

#include <string>

namespace fsam {
namespace cuda {
namespace {
__global__ void probe_kernel() {}
}  // namespace

std::string build_info() {
  return "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

std::string kernel_probe(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return "cannot select CUDA device " + std::to_string(device);
  }
  // Fails with "no kernel image is available" when no compiled arch (or PTX) fits the GPU; every
  // kernel of the extension is compiled for the same arch list.
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later CUDA calls are unaffected
    return cudaGetErrorString(err);
  }
  return "";
}

}  // namespace cuda
}  // namespace fsam
