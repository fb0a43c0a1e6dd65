"""Training of the small models that ship with pdopt (byte tokenizer, stdlib corpus, dense training loop)."""
