"""Evaluations: perplexity sweeps, generation, chat answers, retrieval, answer matching, intervals, plots."""
