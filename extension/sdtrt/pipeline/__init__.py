"""From a checkpoint to an engine and back to its weights: reading checkpoints (checkpoint), recognising the family
(families), ONNX export (export), the build into the cache (build), refit plans (refit) and LoRA weights (lora)."""
