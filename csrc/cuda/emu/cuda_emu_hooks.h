/* Test hooks of the host emulation (csrc/cuda/emu), used by the emulated
 * module's binding only. */
#ifndef DS_CUDA_EMU_HOOKS_H
#define DS_CUDA_EMU_HOOKS_H

#ifdef __cplusplus
extern "C" {
#endif

/* The emulation's stand-in for torch's cuBLAS handle (one per process, like
 * torch's per-thread handle it is created once), bound to `stream` as
 * torch.cuda.current_blas_handle() binds torch's to the current stream. */
void *ds_emu_blas_handle(void *stream);
/* GEMM calls (cublasGemmEx, cublasGemmGroupedBatchedEx) made on a handle. */
long long ds_emu_blas_handle_calls(void *handle);
/* GEMM calls with a 16-bit output that ran while the handle's math mode
 * allowed reduced-precision reductions. */
long long ds_emu_blas_reduced_calls(void *handle);
/* The handle's math mode (set to `mode` first when set != 0). */
int ds_emu_blas_math_mode(void *handle, int set, int mode);
/* Misaligned-address faults raised by the emulated grouped GEMM. */
int ds_emu_faults(void);
/* One 8 x 8 x k problem through the emulated cublasGemmGroupedBatchedEx
 * with the given types (cudaDataType values) and compute type, A, B and C
 * offset_bytes past 256-byte aligned buffers: its status, and whether it
 * faulted (a misaligned address, reported on the device, not as a status). */
int ds_emu_grouped_probe(int atype, int btype, int ctype, int compute, int k, int offset_bytes, int *faulted);
/* The status of the emulated cublasGemmEx for a type combination. */
int ds_emu_gemm_ex_probe(int atype, int btype, int ctype, int compute);

#ifdef __cplusplus
}
#endif
#endif
