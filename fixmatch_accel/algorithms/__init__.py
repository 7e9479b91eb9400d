"""Semi-supervised objectives as pure functions of logits: no loop, data or Accelerator."""
