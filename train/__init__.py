"""Stage 2: train many sparse autoencoders at once from the activation cache (issue 3).

The cache alone is enough: nothing here loads the language model. Entry points: ``train.cli``
(the ``pipeline.py train`` subcommand) and ``train.trainer.run_training``.
"""
