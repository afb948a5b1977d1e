// LOCALPROP_HOST_DEVICE marks the inline math that the CPU and the CUDA code share
// (activation.h, update_math.h): under nvcc it is host and device code, elsewhere plain C++.
#pragma once

#ifdef __CUDACC__
#define LOCALPROP_HOST_DEVICE __host__ __device__
#else
#define LOCALPROP_HOST_DEVICE
#endif
