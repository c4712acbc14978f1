"""What the PcaLlama model is made of: config, projections, model classes, RoPE, registration, PCA fitting."""
