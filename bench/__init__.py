"""moestream.bench: reproducible memory-budget benchmarks (child processes in memory cgroups)."""
