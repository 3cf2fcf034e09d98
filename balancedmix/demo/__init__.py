"""The demo: a synthetic multi-task suite, a tiny causal LM and tokenizer built in code."""
