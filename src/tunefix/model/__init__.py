"""The model layer: model files (``files``), loading with the doctor's fixes (``load``), LoRA,
checkpointing, the loss and the memory switches. Nothing is imported here: each module is
imported where it is used, so ``import tunefix.model.files`` stays free of torch."""
