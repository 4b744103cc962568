"""Scoring models against human feature-importance maps and psychophysics decision curves.

Modules:

* `models`: load a `.keras` file, a SavedModel, a zoo model, a released Keras 2 `.h5` or a
  user explainer, with the preprocessing it expects.
* `mapsets`: ClickMe shards, the project's records and folders of image/map pairs.
* `scoring`: the batched evaluation loop, its counts and bootstrap standard deviations.
* `ceiling`: the split-half human ceiling and the center-bias baseline.
* `psychophysics`: masked stimuli on phase-scrambled backgrounds and decision curves.
* `figures`: the accuracy-alignment scatter, map panels and decision curves (matplotlib).
"""
