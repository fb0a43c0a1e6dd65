"""Training of the small models that ship with pdopt (stdlib corpus, dense training loop); their byte tokenizer
is `pdopt.models.tokenizer`."""
