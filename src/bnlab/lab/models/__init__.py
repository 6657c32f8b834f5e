"""Models of the lab; each takes `norm_layer` and never hard-codes a normalization."""
