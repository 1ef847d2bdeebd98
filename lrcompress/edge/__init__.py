"""Edge: example inputs, export to ONNX / ORT / Core ML through exporters/, validation on the runtime."""
