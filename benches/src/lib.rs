//! Benchmarks live in `benches/benches/`; see `cargo bench -p benches`.
