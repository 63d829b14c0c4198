"""Neuron Steadiness Regularization: the regularizer (torch only) plus an optional training engine."""

from .regularizer import ClassMeanMemory, NeuronSteadiness, steadiness_loss

__all__ = ["NeuronSteadiness", "ClassMeanMemory", "steadiness_loss"]
