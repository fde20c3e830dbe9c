"""Proposal generators of two-stage detectors: candidate boxes for the RoI heads."""
from .build import PROPOSAL_GENERATOR_REGISTRY, build_proposal_generator

# imported for its registration
from .rpn import RPN  # noqa: E402

__all__ = ["PROPOSAL_GENERATOR_REGISTRY", "build_proposal_generator", "RPN"]
