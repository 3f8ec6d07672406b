"""Multi-adapter serving (installed as alphalora.serving); the engine arrives with its own issue."""
