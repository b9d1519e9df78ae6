/*
 * TideHiddenCapture plugin: build-time checks, serialization, registration (see tideHiddenCapturePlugin.h).
 */
#include "tideHiddenCapturePlugin.h"
#include "tideHiddenCaptureKernel.h"

#include <cstring>
#include <exception>
#include <memory>
#include <string>

#define TIDE_EXPORT __attribute__((visibility("default")))

using namespace nvinfer1;

namespace
{

ILoggerFinder* gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept
{
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, ("[TideHiddenCapture] " + message).c_str());
    }
}

bool knownDim(int64_t d)
{
    return d >= 0; // -1 marks a dimension that is only known at run time
}

} // namespace

namespace tide
{

int32_t elementBytes(DataType type) noexcept
{
    switch (type)
    {
    case DataType::kFLOAT: return 4;
    case DataType::kHALF: return 2;
    case DataType::kBF16: return 2;
    default: return 0;
    }
}

// ---- plugin ------------------------------------------------------------------------------------------------

TideHiddenCapturePlugin::TideHiddenCapturePlugin(
    int32_t layerIndex, int32_t captureSlot, int32_t numSlots, int32_t hasAccumulator)
    : mLayerIndex(layerIndex)
    , mCaptureSlot(captureSlot)
    , mNumSlots(numSlots)
    , mHasAccumulator(hasAccumulator)
{
    initFieldsToSerialize();
}

TideHiddenCapturePlugin::TideHiddenCapturePlugin(TideHiddenCapturePlugin const& other)
    : mLayerIndex(other.mLayerIndex)
    , mCaptureSlot(other.mCaptureSlot)
    , mNumSlots(other.mNumSlots)
    , mHasAccumulator(other.mHasAccumulator)
{
    initFieldsToSerialize(); // the fields must point at this object's members, not other's
}

void TideHiddenCapturePlugin::initFieldsToSerialize()
{
    mFields.clear();
    mFields.emplace_back("layer_index", &mLayerIndex, PluginFieldType::kINT32, 1);
    mFields.emplace_back("capture_slot", &mCaptureSlot, PluginFieldType::kINT32, 1);
    mFields.emplace_back("num_slots", &mNumSlots, PluginFieldType::kINT32, 1);
    mFields.emplace_back("has_accumulator", &mHasAccumulator, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* TideHiddenCapturePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* TideHiddenCapturePlugin::clone() noexcept
{
    try
    {
        return std::make_unique<TideHiddenCapturePlugin>(*this).release();
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* TideHiddenCapturePlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* TideHiddenCapturePlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* TideHiddenCapturePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t TideHiddenCapturePlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t TideHiddenCapturePlugin::expectedInputs() const noexcept
{
    return mHasAccumulator != 0 ? 2 : 1;
}

bool TideHiddenCapturePlugin::checkShapes(Dims const& hidden, Dims const* acc, Dims const& out) const noexcept
{
    if (hidden.nbDims != 2 || out.nbDims != 3)
    {
        return false;
    }
    auto same = [](int64_t a, int64_t b) { return !knownDim(a) || !knownDim(b) || a == b; };
    bool ok = same(out.d[0], hidden.d[0]) && same(out.d[1], mNumSlots) && same(out.d[2], hidden.d[1]);
    if (acc != nullptr)
    {
        ok = ok && acc->nbDims == 3 && same(acc->d[0], hidden.d[0]) && same(acc->d[1], mNumSlots)
            && same(acc->d[2], hidden.d[1]);
    }
    return ok;
}

int32_t TideHiddenCapturePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != 1)
    {
        logError("layer " + std::to_string(mLayerIndex) + ": expected " + std::to_string(expectedInputs())
            + " input(s) and 1 output");
        return -1;
    }
    Dims const* acc = nbInputs == 2 ? &in[1].desc.dims : nullptr;
    if (!checkShapes(in[0].desc.dims, acc, out[0].desc.dims))
    {
        logError("layer " + std::to_string(mLayerIndex) + ": hidden must be [num_tokens, hidden] (remove_input_padding) "
            "and accumulator/output [num_tokens, num_slots, hidden]");
        return -1;
    }
    return 0;
}

bool TideHiddenCapturePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return elementBytes(desc.type) > 0;
    }
    return desc.type == inOut[0].desc.type; // accumulator and output share the hidden dtype
}

int32_t TideHiddenCapturePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != expectedInputs() || elementBytes(inputTypes[0]) == 0)
    {
        return -1;
    }
    if (nbInputs == 2 && inputTypes[1] != inputTypes[0])
    {
        logError("layer " + std::to_string(mLayerIndex) + ": accumulator dtype differs from hidden dtype");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t TideHiddenCapturePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != 1 || inputs[0].nbDims != 2
        || (nbInputs == 2 && inputs[1].nbDims != 3))
    {
        return -1;
    }
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];                   // num_tokens
    outputs[0].d[1] = exprBuilder.constant(mNumSlots);  // capture slots
    outputs[0].d[2] = inputs[0].d[1];                   // hidden
    return 0;
}

int32_t TideHiddenCapturePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != 1)
    {
        return -1;
    }
    Dims const* acc = nbInputs == 2 ? &in[1].dims : nullptr;
    return checkShapes(in[0].dims, acc, out[0].dims) ? 0 : -1;
}

int32_t TideHiddenCapturePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    int32_t const bytes = elementBytes(inputDesc[0].type);
    int64_t const numTokens = inputDesc[0].dims.d[0];
    int64_t const hiddenSize = inputDesc[0].dims.d[1];
    void const* accumulator = mHasAccumulator != 0 ? inputs[1] : nullptr;
    cudaError_t const status = launchHiddenCapture(
        inputs[0], accumulator, outputs[0], numTokens, hiddenSize, mNumSlots, mCaptureSlot, bytes, stream);
    if (status != cudaSuccess)
    {
        logError("layer " + std::to_string(mLayerIndex) + ": " + cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* TideHiddenCapturePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // stateless: nothing per execution context
}

PluginFieldCollection const* TideHiddenCapturePlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---- creator -----------------------------------------------------------------------------------------------

TideHiddenCapturePluginCreator::TideHiddenCapturePluginCreator()
{
    mFieldNames.emplace_back("layer_index", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("capture_slot", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("num_slots", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("has_accumulator", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* TideHiddenCapturePluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* TideHiddenCapturePluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* TideHiddenCapturePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* TideHiddenCapturePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* TideHiddenCapturePluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int32_t layerIndex{-1};
        int32_t captureSlot{-1};
        int32_t numSlots{kDEFAULT_NUM_SLOTS};
        int32_t hasAccumulator{0};
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.type != PluginFieldType::kINT32 || f.length != 1 || f.data == nullptr)
            {
                logError(std::string("field ") + f.name + " must be one int32");
                return nullptr;
            }
            int32_t const value = *static_cast<int32_t const*>(f.data);
            if (std::strcmp(f.name, "layer_index") == 0)
            {
                layerIndex = value;
            }
            else if (std::strcmp(f.name, "capture_slot") == 0)
            {
                captureSlot = value;
            }
            else if (std::strcmp(f.name, "num_slots") == 0)
            {
                numSlots = value;
            }
            else if (std::strcmp(f.name, "has_accumulator") == 0)
            {
                hasAccumulator = value;
            }
            else
            {
                logError(std::string("unknown field ") + f.name);
                return nullptr;
            }
        }
        if (layerIndex < 0 || numSlots < 1 || captureSlot < 0 || captureSlot >= numSlots
            || (hasAccumulator != 0 && hasAccumulator != 1))
        {
            logError("need layer_index >= 0, num_slots >= 1, 0 <= capture_slot < num_slots, has_accumulator 0/1");
            return nullptr;
        }
        return new TideHiddenCapturePlugin(layerIndex, captureSlot, numSlots, hasAccumulator);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace tide

// ---- library entry points (IPluginRegistry::loadLibrary) ----------------------------------------------------

extern "C" TIDE_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

extern "C" TIDE_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static tide::TideHiddenCapturePluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
