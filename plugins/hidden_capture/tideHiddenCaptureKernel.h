/*
 * TideHiddenCapture: copy the residual stream of one decoder layer into slot `slot` of the capture buffer.
 *
 *   out[n, s, :] = hidden[n, :]      for s == slot
 *   out[n, s, :] = accIn[n, s, :]    for s != slot when an accumulator input is given
 *   out[n, s, :] = 0                 for s != slot otherwise (the first plugin of the chain)
 *
 * hidden [numTokens, hiddenSize], accIn / out [numTokens, numSlots, hiddenSize], all of one dtype.
 * The copy is dtype-agnostic: it moves elemBytes-sized elements (vectorised when rows are aligned).
 */
#pragma once

#include <cstdint>
#if !defined(TIDE_CAPTURE_HOST_ONLY)
#include <cuda_runtime_api.h>
#endif

#if defined(__CUDACC__)
#define TIDE_HOST_DEVICE __host__ __device__
#else
#define TIDE_HOST_DEVICE
#endif

namespace tide
{

enum class CaptureSource : int32_t
{
    kHidden = 0,
    kAccumulator = 1,
    kZero = 2,
};

struct CaptureIndex
{
    CaptureSource source;
    int64_t offset; // element offset into hidden (kHidden) or accIn (kAccumulator)
};

//! Where flat output element i of [numTokens, numSlots, rowElems] comes from. Shared by the CUDA kernel and
//! the host-side unit test (tests/test_trtllm_layer.py compiles it with g++).
TIDE_HOST_DEVICE inline CaptureIndex captureSource(
    int64_t i, int64_t rowElems, int32_t numSlots, int32_t slot, bool hasAccumulator)
{
    int64_t const col = i % rowElems;
    int64_t const rest = i / rowElems;
    int32_t const s = static_cast<int32_t>(rest % numSlots);
    int64_t const token = rest / numSlots;
    if (s == slot)
    {
        return CaptureIndex{CaptureSource::kHidden, token * rowElems + col};
    }
    if (hasAccumulator)
    {
        return CaptureIndex{CaptureSource::kAccumulator, i};
    }
    return CaptureIndex{CaptureSource::kZero, 0};
}

#if !defined(TIDE_CAPTURE_HOST_ONLY) // host-only builds (the g++ unit test) see just captureSource()
//! Enqueue the capture copy on `stream`. accIn may be nullptr. Returns cudaErrorInvalidValue on bad
//! arguments, otherwise the launch status.
cudaError_t launchHiddenCapture(void const* hidden, void const* accIn, void* out, int64_t numTokens,
    int64_t hiddenSize, int32_t numSlots, int32_t slot, int32_t elemBytes, cudaStream_t stream);
#endif

} // namespace tide
