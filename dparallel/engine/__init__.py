"""The decoding engine: rules, the sampling loop and its statistics."""

from dparallel.engine.rules import Proposal, Rule, StepContext, build_rule
from dparallel.engine.sampler import DecodeConfig, DecodeStats, Sampler

__all__ = ["DecodeConfig", "DecodeStats", "Proposal", "Rule", "Sampler", "StepContext", "build_rule"]
