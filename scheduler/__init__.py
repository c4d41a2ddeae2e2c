"""moestream.scheduler: memory planning, the expert arena, loaders, cache policies, analysis.

Deals only in keys (layer, expert, level), byte ranges, budgets and traces;
knows nothing about model families, tokenizers or HTTP.
"""
