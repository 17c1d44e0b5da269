"""beitdomain: BEiT masked image modeling for specialized imagery (DICOM, TIFF, RGB).

The chain: retrain a discrete-VAE tokenizer on your images, continue BEiT pre-training on them
without labels, fine-tune with a few labels, and measure how many labels pre-training saved.
"""

__version__ = "0.1.0"
