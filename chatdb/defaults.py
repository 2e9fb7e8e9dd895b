"""Defaults that the data layer applies and the CLI's help states, declared once in a
module that imports nothing: ``chatdb --help`` shows them without importing the data
layer (SQLAlchemy, psycopg; ``tests/integration/test_startup.py``)."""

#: Seconds to keep retrying a server that does not answer (``db.connect()``,
#: ``--connect-timeout``).
DEFAULT_CONNECT_TIMEOUT = 10.0
