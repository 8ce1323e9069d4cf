"""A real MCP server for the tests (see `server.py`)."""
