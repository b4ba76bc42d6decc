"""An MCP server and client built on the official MCP Python SDK, for end-to-end login tests."""
