"""Inference: loading a trained model, fill-mask predictions (predict.py), the ONNX export and the web demo.

Nothing here imports the training side (config, data, modeling, the loop): what both need lives in the neutral
modules mlm.common.cli, mlm.model.heads, mlm.common.hub and mlm.data.text. tests/test_layout.py holds the line.
"""
