"""fast-sae: sparse autoencoders for instruct models, trained the FAST way.

Packages, in the direction data flows: ``lm`` (models), ``harvest`` (model -> activation cache),
``actcache`` (the cache format), ``train`` (cache -> SAE checkpoints), ``saeio`` (the checkpoint
format), ``evaluate`` (checkpoints + cache -> reports). The stages meet only through ``actcache``
and ``saeio``.
"""
__version__ = "0.2.0"
