"""The model's files: checkpoints (find, read safely, judge whether a fit is finished), the peft/merged export and
ONNX."""
