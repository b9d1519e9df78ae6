/*
 * TideHiddenCapture — a TensorRT IPluginV3 that copies the residual stream entering one decoder layer into one
 * slot of the EAGLE-3 capture buffer, so a TensorRT-LLM engine emits [num_tokens, 3, hidden] alongside logits.
 *
 * Inputs   0: hidden        [num_tokens, hidden]            float32 | float16 | bfloat16
 *          1: accumulator   [num_tokens, num_slots, hidden]  same dtype (absent on the first plugin of a chain)
 * Output   0: capture       [num_tokens, num_slots, hidden]  same dtype
 * Fields   layer_index (int32, the decoder layer whose input is captured; metadata + error messages)
 *          capture_slot (int32, 0 <= capture_slot < num_slots), num_slots (int32, default 3),
 *          has_accumulator (int32 0/1: whether input 1 exists; 0 -> the other slots are zero-filled)
 *
 * Name "TideHiddenCapture", version "1", namespace "tide". The shared library exports getCreators() and
 * setLoggerFinder(), so `trt.get_plugin_registry().load_library(path)` registers it.
 */
#pragma once

#include "NvInferRuntime.h"

#include <cstdint>
#include <string>
#include <vector>

namespace tide
{

constexpr char const* kPLUGIN_NAME = "TideHiddenCapture";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "tide";
constexpr int32_t kDEFAULT_NUM_SLOTS = 3;

class TideHiddenCapturePlugin : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime
{
public:
    TideHiddenCapturePlugin(int32_t layerIndex, int32_t captureSlot, int32_t numSlots, int32_t hasAccumulator);
    TideHiddenCapturePlugin(TideHiddenCapturePlugin const& other);
    TideHiddenCapturePlugin& operator=(TideHiddenCapturePlugin const&) = delete;
    ~TideHiddenCapturePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    bool supportsFormatCombination(
        int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void initFieldsToSerialize();
    int32_t expectedInputs() const noexcept;
    bool checkShapes(nvinfer1::Dims const& hidden, nvinfer1::Dims const* acc, nvinfer1::Dims const& out) const noexcept;

    int32_t mLayerIndex;
    int32_t mCaptureSlot;
    int32_t mNumSlots;
    int32_t mHasAccumulator;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class TideHiddenCapturePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    TideHiddenCapturePluginCreator();
    ~TideHiddenCapturePluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

//! Size in bytes of one element of a capture-able dtype; 0 for any other dtype.
int32_t elementBytes(nvinfer1::DataType type) noexcept;

} // namespace tide
