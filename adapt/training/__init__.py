"""Training: the Trainer loop, attention kernels."""
