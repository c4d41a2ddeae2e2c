"""moestream.engine: the runtime (model families, KV cache, sampling, generation, CLI, server, API)."""
