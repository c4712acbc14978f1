"""Files in and out: embedded assets, text sources, model loading, projection artifacts, atomic writes."""
