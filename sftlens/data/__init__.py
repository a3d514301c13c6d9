"""Stage 1: facts (EntityQuestions, or any fact set), the paper's templates, and alias-aware answer matching."""

from sftlens.data.facts import (
    Fact,
    FactSet,
    RelationTemplates,
    available_templates,
    data_dir_from,
    fact_id,
    first_per_relation,
    in_domain_relations,
    load_facts,
    load_templates,
    parse_fact_id,
    parse_relations,
)
from sftlens.data.factset import fact_set_stats, load_fact_set
from sftlens.data.matching import Matcher, default_matcher, normalize
from sftlens.data.prompts import encode_prompt, sft_completion, sft_prompt
from sftlens.data.selection import (
    add_fact_arguments,
    add_fact_source_arguments,
    fact_selection,
    fact_set_from_args,
    facts_from_args,
    select_from_args,
)

__all__ = [
    "Fact", "FactSet", "RelationTemplates", "Matcher", "data_dir_from", "default_matcher", "first_per_relation",
    "in_domain_relations", "load_facts", "load_templates", "available_templates", "normalize",
    "parse_fact_id", "parse_relations", "fact_id", "encode_prompt", "sft_completion", "sft_prompt",
    "add_fact_arguments", "add_fact_source_arguments", "fact_set_from_args", "facts_from_args", "fact_set_stats",
    "load_fact_set", "fact_selection", "select_from_args",
]
