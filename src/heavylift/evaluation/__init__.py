"""Quality of each precision against a reference: perplexity, KL divergence, same top token (heavylift eval)."""
