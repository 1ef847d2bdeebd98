"""Recovery: LoRA residual distillation against the original, folded back into the factors."""
