"""Neuron Steadiness Regularization: the regularizer (torch only) plus an optional training engine."""

from .center_loss import CenterLoss
from .regularizer import ClassMeanMemory, NeuronSteadiness, steadiness_loss

__all__ = ["NeuronSteadiness", "CenterLoss", "ClassMeanMemory", "steadiness_loss"]
