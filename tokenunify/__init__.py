"""tokenunify: TokenUnify pretraining and blockwise neuron segmentation for EM volumes."""

__version__ = "0.1.0"
