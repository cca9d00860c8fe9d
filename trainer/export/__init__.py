"""The export stage: a trained classifier -> a model package (ONNX and TFLite, fp32 and int8, model.json)."""
