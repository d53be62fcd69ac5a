"""Training: the LightningModule base, the trainer, and the methods that live in dparallel/ (pretrain, distill)."""
