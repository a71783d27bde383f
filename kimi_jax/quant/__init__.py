"""Weight quantization formats: INT4 routed experts (compressed-tensors ``pack-quantized``)
and FP8 blocks, on the host (the converter) and on the device (``formats``)."""
