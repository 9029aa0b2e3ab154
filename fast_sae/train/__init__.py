"""Stage 2: train many sparse autoencoders at once from the activation cache .

The cache alone is enough: nothing here loads the language model. Entry points: ``fast_sae.train.cli``
(the ``pipeline.py train`` subcommand) and ``fast_sae.train.trainer.Trainer(...).run()``.
"""
