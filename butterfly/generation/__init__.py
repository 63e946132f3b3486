"""The coordinator's half of generation: sessions of rows, their tokens, replay, batching.

The stages' half (each stage's KV caches for a session) is :mod:`butterfly.model.stage_sessions`.
"""

from .sampling import SamplingParams as SamplingParams
from .sampling import check_token_ids as check_token_ids
from .sampling import next_tokens as next_tokens
from .service import GenerationService as GenerationService
