"""The OpenAI-compatible HTTP server (`hetero serve`) on the serving engine (hetero/engine/)."""
