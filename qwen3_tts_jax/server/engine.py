"""The batching engine lives in `qwen3_tts_jax.engine` (it serves the batch tool and the API's text
in pieces too); this name stays for code that imported it from the server."""
from ..engine import (BatchEngine, DeadlineExceeded, EnginePool, Job, QueueFull,  # noqa: F401
                      stream_pieces)
from ..text_feed import TextFeed, commit_point  # noqa: F401
