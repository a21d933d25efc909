"""Training: pretraining and (later) fine-tuning, single process or torchrun/DDP."""
