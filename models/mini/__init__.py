"""xmodal-mini: the bundled default model. A frozen MiniLM text tower defines the joint space; small image and
audio towers are trained onto it on generated scenes and sounds (``data``), by ``train`` and the ``recipe``.

Only ``data`` and ``prepare`` are torch-free; ``towers`` and ``recipe`` need the ``export`` extra. The trainer the
recipe runs is the generic one behind ``xmodal models train --pairs``: ``models.training.trainer``.
"""
