"""NLP adapter: T5 / causal-LM task arithmetic (transformers)."""
