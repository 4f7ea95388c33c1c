"""The optimiser setting (``optim.name``): torch's optimiser classes by name."""

import torch

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "sgd": torch.optim.SGD,
}
# torch's fused kernels do one optimizer step in one pass over the parameters, on CPU and
# GPU: the same update, about 25% less time per training step for the MLPs here (make bench).
FUSED = {"adam", "adamw", "sgd"}
