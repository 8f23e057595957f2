"""Deployment: the model as an ONNX graph (any image size), its runtime, parity checks against PyTorch, an fp16
variant with fp32 islands, CPU timing. Library code: imports the model, never the trainer (docs/deploy.md)."""
