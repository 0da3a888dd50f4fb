"""Ways of using a model through its prompt: self-consistency (more to come: templates, few-shot)."""

from jaxllm.prompting.self_consistency import (SelfConsistencyResult, extract_answer, majority_vote,
                                               self_consistency)

__all__ = ["SelfConsistencyResult", "extract_answer", "majority_vote", "self_consistency"]
