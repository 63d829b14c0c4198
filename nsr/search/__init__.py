"""The λ search with NNI: launcher, experiment config, trial link, workarounds."""
