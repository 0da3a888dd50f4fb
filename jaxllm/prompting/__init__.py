"""Ways of using a model through its prompt: templates and chat, few-shot learning, choosing the
in-context examples, self-consistency."""

from jaxllm.prompting.few_shot import FewShotLearner, as_examples
from jaxllm.prompting.selection import METHODS, ExampleSelector, KMeansResult, kmeans, select_examples
from jaxllm.prompting.self_consistency import (SelfConsistencyResult, extract_answer, majority_vote,
                                               self_consistency)
from jaxllm.prompting.templates import (BUILTIN_TEMPLATES, SENTIMENT_LABELS, JSONExtractionError, PromptTemplate,
                                        TemplateError, add_constraints, add_output_format, add_role,
                                        apply_chat_template, build_prompt, extract_json, get_template,
                                        list_templates, register_template, render_template, try_extract_json)

__all__ = ["BUILTIN_TEMPLATES", "METHODS", "SENTIMENT_LABELS", "ExampleSelector", "FewShotLearner",
           "JSONExtractionError", "KMeansResult", "PromptTemplate", "SelfConsistencyResult", "TemplateError",
           "add_constraints", "add_output_format", "add_role", "apply_chat_template", "as_examples",
           "build_prompt", "extract_json", "extract_answer", "get_template", "kmeans", "list_templates",
           "majority_vote", "register_template", "render_template", "select_examples", "self_consistency",
           "try_extract_json"]
