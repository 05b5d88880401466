"""picochat: train your own small ChatGPT end to end, from raw text to a chat UI and API."""

__version__ = "0.1.0"
