"""chatdb: admin and operations CLI for the PostgreSQL store of an AI chatbot."""

__version__ = "0.1.0"
