/*
 * CUDA side of TideHiddenCapture (see tideHiddenCaptureKernel.h for the contract).
 */
#include "tideHiddenCaptureKernel.h"

#include <algorithm>
#include <cstdint>

namespace tide
{
namespace
{

constexpr int32_t kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename V>
__global__ void hiddenCaptureKernel(V const* __restrict__ hidden, V const* __restrict__ accIn, V* __restrict__ out,
    int64_t total, int64_t rowVecs, int32_t numSlots, int32_t slot)
{
    bool const hasAcc = accIn != nullptr;
    int64_t const stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    {
        CaptureIndex const src = captureSource(i, rowVecs, numSlots, slot, hasAcc);
        V value{}; // zero for CaptureSource::kZero
        if (src.source == CaptureSource::kHidden)
        {
            value = hidden[src.offset];
        }
        else if (src.source == CaptureSource::kAccumulator)
        {
            value = accIn[src.offset];
        }
        out[i] = value;
    }
}

template <typename V>
cudaError_t launchTyped(void const* hidden, void const* accIn, void* out, int64_t numTokens, int64_t rowBytes,
    int32_t numSlots, int32_t slot, cudaStream_t stream)
{
    int64_t const rowVecs = rowBytes / static_cast<int64_t>(sizeof(V));
    int64_t const total = numTokens * numSlots * rowVecs;
    if (total == 0)
    {
        return cudaSuccess;
    }
    int64_t const blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
    hiddenCaptureKernel<V><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(static_cast<V const*>(hidden),
        static_cast<V const*>(accIn), static_cast<V*>(out), total, rowVecs, numSlots, slot);
    return cudaGetLastError();
}

bool alignedTo(int64_t alignment, int64_t rowBytes, void const* a, void const* b, void const* c)
{
    auto ok = [alignment](void const* p)
    { return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(alignment) == 0; };
    return rowBytes % alignment == 0 && ok(a) && ok(b) && ok(c);
}

} // namespace

cudaError_t launchHiddenCapture(void const* hidden, void const* accIn, void* out, int64_t numTokens,
    int64_t hiddenSize, int32_t numSlots, int32_t slot, int32_t elemBytes, cudaStream_t stream)
{
    if (hidden == nullptr || out == nullptr || numTokens < 0 || hiddenSize <= 0 || numSlots < 1 || slot < 0
        || slot >= numSlots || elemBytes <= 0)
    {
        return cudaErrorInvalidValue;
    }
    int64_t const rowBytes = hiddenSize * elemBytes;
    if (alignedTo(16, rowBytes, hidden, accIn, out))
    {
        return launchTyped<uint4>(hidden, accIn, out, numTokens, rowBytes, numSlots, slot, stream);
    }
    if (alignedTo(8, rowBytes, hidden, accIn, out))
    {
        return launchTyped<uint2>(hidden, accIn, out, numTokens, rowBytes, numSlots, slot, stream);
    }
    if (alignedTo(4, rowBytes, hidden, accIn, out))
    {
        return launchTyped<uint32_t>(hidden, accIn, out, numTokens, rowBytes, numSlots, slot, stream);
    }
    if (alignedTo(2, rowBytes, hidden, accIn, out))
    {
        return launchTyped<uint16_t>(hidden, accIn, out, numTokens, rowBytes, numSlots, slot, stream);
    }
    return launchTyped<uint8_t>(hidden, accIn, out, numTokens, rowBytes, numSlots, slot, stream);
}

} // namespace tide
