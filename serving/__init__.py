"""Multi-adapter serving (installed as alphalora.serving): the engine, the OpenAI-compatible server, vLLM."""
