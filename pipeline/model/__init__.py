"""The embedding model: backbone + pooling + normalisation, packed/padded inputs, varlen attention."""
