//! The global allocator of every program linking sluice (the server, the
//! load generator and its no-op ceiling, the tests), chosen by measurement:
//! a decision allocates and frees a few dozen small blocks across two
//! worker threads, where glibc's malloc and free took 11-16 % of the
//! server's CPU samples (BENCHMARKS.md, "What each change bought"). The `mimalloc` feature (the default) or `jemalloc`;
//! neither gives the system's.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
