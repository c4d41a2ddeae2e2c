"""moestream.convert: HF checkpoint reading, the shard format, codecs and compression.

Knows nothing about the runtime scheduler or the engine.
"""
