// The op schemas (defined once for every device) and the Python module that loads them.
//
// Implementations register per device in the op-family files: *_cpu.cpp for CPU, *_cuda.cu for CUDA.
// Fake (meta) implementations live in fsam_kernels/_native_ops.py, which the module init below imports
// (set_python_module names it in torch's error messages too).
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifdef FSAM_WITH_CUDA
namespace fsam {
namespace cuda {
std::string build_info();               // e.g. "CUDA 13.0"
std::string kernel_probe(int device);  // "" when the kernels have an image for the device, else why not
}  // namespace cuda
}  // namespace fsam
#endif

TORCH_LIBRARY(fsam_kernels, m) {
  m.set_python_module("fsam_kernels._native_ops");
  // accum[i] += fl32(grads[i] * grads[i]); accum fp32.
  m.def("fisher_accumulate(Tensor(a!)[] accum, Tensor[] grads) -> ()");
  // Packed uint8 mask of the k largest keys over all scores (tie: lowest global bit index).
  m.def("select_mask(Tensor[] scores, int[] bit_offsets, int mask_bytes, int k, bool square) -> Tensor");
  // The sharded top-k's primitives (fsam_kernels/distributed_select.py), keys in the reference's int32
  // space: int64 (n_tensors, 2**radix_bits) counts of digit (key >> shift) of the keys >= 0 whose bits
  // above shift + radix_bits equal prefix; and the packed mask of the keys > threshold plus, per tensor,
  // the first quotas[i] keys == threshold (row-major).
  m.def("key_histogram(Tensor[] scores, bool square, int prefix, int shift, int radix_bits) -> Tensor");
  m.def(
      "mask_from_threshold(Tensor[] scores, int[] bit_offsets, int mask_bytes, bool square, int threshold, "
      "int[] quotas) -> Tensor");
  // Packed mask keeping the n largest keys of every m consecutive elements of each score tensor (whose
  // bits start at bit_offsets[i]); support (empty, or one tensor per score): zeros are never kept.
  m.def(
      "select_nm_mask(Tensor[] scores, Tensor[] support, int[] bit_offsets, int mask_bytes, int n, int m, "
      "bool square) -> Tensor");
  // int64 exclusive prefix count of set bits per 512-bit block, plus the total at the end.
  m.def("mask_block_prefix(Tensor bits) -> Tensor");
  // Global L2 norm of the (ASAM-weighted) gradients, 0-dim, in the norm dtype (fp64 when a tensor is fp64,
  // else fp32; inf where it exceeds that dtype: see fsam_kernels/reference.py). A parameter whose grad
  // is None does not count.
  m.def("grad_norm(Tensor[] params, Tensor?[] grads, bool[] adaptive) -> Tensor");
  // params += e on masked elements (bit_offsets[i] >= 0) or all elements (-1), for every parameter with
  // a gradient; their originals into one compact buffer per weight dtype: params[i]'s saved_counts[i]
  // originals (its set mask bits, or its numel when dense) at saved[saved_slots[i]][saved_offsets[i]:]
  // (slot -1 exactly where grads[i] is None). Checked on every device (csrc/checks.h).
  m.def(
      "masked_perturb(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] saved, int[] saved_slots, "
      "int[] saved_offsets, int[] saved_counts, Tensor bits, Tensor block_prefix, int[] bit_offsets, float[] rho, "
      "bool[] adaptive, Tensor norm, float eps) -> ()");
  // Writes the originals back (a no-op when norm is not finite, like masked_perturb).
  m.def(
      "masked_restore(Tensor(a!)[] params, Tensor[] saved, int[] saved_slots, int[] saved_offsets, "
      "int[] saved_counts, Tensor bits, Tensor block_prefix, int[] bit_offsets, Tensor norm) -> ()");
}

namespace {

#define FSAM_STR2(x) #x
#define FSAM_STR(x) FSAM_STR2(x)

PyObject* cuda_kernel_probe(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
#ifdef FSAM_WITH_CUDA
  const std::string why = fsam::cuda::kernel_probe(static_cast<int>(device));
#else
  const std::string why = "the extension was built without CUDA kernels";
#endif
  return PyUnicode_FromString(why.c_str());
}

PyMethodDef methods[] = {
    {"cuda_kernel_probe", cuda_kernel_probe, METH_O,
     "cuda_kernel_probe(device_index) -> str: '' if the CUDA kernels can run on that GPU, else the reason."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "fsam_kernels native ops, registered as torch.ops.fsam_kernels.*", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef FSAM_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
  PyModule_AddStringConstant(m, "cuda_build", fsam::cuda::build_info().c_str());
  PyModule_AddStringConstant(m, "cuda_archs", FSAM_STR(FSAM_CUDA_ARCHS));
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
  PyModule_AddStringConstant(m, "cuda_build", "");
  PyModule_AddStringConstant(m, "cuda_archs", "");
#endif
  PyModule_AddStringConstant(m, "torch_version", FSAM_STR(FSAM_TORCH_VERSION));
  // The fake implementations: with them, importing this module alone makes the ops traceable.
  PyObject* fakes = PyImport_ImportModule("fsam_kernels._native_ops");
  if (fakes == nullptr) {
    Py_DECREF(m);
    return nullptr;
  }
  Py_DECREF(fakes);
  return m;
}
