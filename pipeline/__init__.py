"""ae-pipeline: 64x64 image autoencoders from ImageNet shards to comparison reports."""
__version__ = "0.1.0"
