"""edgefm exporter: foundation models -> quantized ONNX device bundles (needs the [export] extra)."""
