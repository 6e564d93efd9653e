"""Vision towers beyond transformers' own.

:mod:`model.vision.efficientnet_lite` — EfficientNet-Lite (ImageNet-initialised, fine-tuned on fundus photographs)
as the tower of the bundled model; :func:`~model.vision.efficientnet_lite.register` makes transformers' Auto classes
load it. :mod:`model.vision.preprocess` — fundus-aware input framing (cheap to import: no torch).
"""
