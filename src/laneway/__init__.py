"""laneway: an OpenAI-compatible agent gateway with one lane per session key."""

__version__ = "0.1.0"
